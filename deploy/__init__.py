"""Deployment: the `trigfarm` CLI, the farm launcher, monitoring configs and board packages."""
