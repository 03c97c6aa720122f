"""Environment adapters behind one batched multi-agent interface (see ``pamarl.envs.base``)."""
