"""Ways to deploy the server beyond one process (Ray Serve replicas)."""
