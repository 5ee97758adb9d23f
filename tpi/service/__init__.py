"""The worker as a systemd service: its unit file, and installing, inspecting and
removing it with systemctl."""
