"""Facts about this process and machine: memory held, allocator behaviour."""
