"""``lipsync-cluster``: the deployed topology as local processes (inference, compositing replicas, nginx)."""
