"""Docker for the project's image and the kind cluster, on any machine.

``engine``: the system Docker where it is usable as it is, else a private
dockerd that leaves the host firewall alone (and works around VMs that
cannot run privileged containers). ``base``: the Dockerfile's base image
made from Debian packages where none can be pulled. ``image``: the
project's image, built and timed.
"""
