"""Weight formats smaller than float: int8/int4 containers, packing, quantizers."""
