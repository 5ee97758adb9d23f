"""Workers finding each other on the local network (mDNS/DNS-SD, `_tpi._tcp`).

A worker announces what a stranger may see (its ports, protocol version and a
short device summary; never the secret or the models it holds). A master
browses for announcements and checks each worker with the opening of the
ordinary handshake: the worker's answer proves whether it knows the cluster's
secret, and the master never answers it, so a check reserves nothing and
discovery never bypasses authentication.
"""
