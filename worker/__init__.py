"""The worker daemon: runs one rank's slice for whichever master connects."""
