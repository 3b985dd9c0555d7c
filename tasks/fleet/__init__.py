"""A served model at scale: replicas behind a load balancer, on leased cores, autoscaled (:mod:`.fleet`); and the
same deployment as Kubernetes manifests (:mod:`.kubernetes`). The model server itself is :mod:`kiln.tasks.serving`;
this package runs many of them and is never imported by one."""
