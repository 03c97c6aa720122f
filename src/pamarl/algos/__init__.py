"""Algorithms, one file each, registered by name (see :mod:`pamarl.algos.registry`)."""
