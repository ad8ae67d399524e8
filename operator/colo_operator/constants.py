"""Names shared by the operator, its manifests, the chart and the kubectl plugin."""

from __future__ import annotations

from typing import Final

# Container ports of the agent (its defaults, colo_agent.constants); the client
# Service maps spec.service.port onto CLIENT_PORT.
from colo_agent.constants import CLIENT_PORT as CLIENT_PORT
from colo_agent.constants import CONTROL_PORT as CONTROL_PORT
from colo_agent.constants import REPLICATION_PORT as REPLICATION_PORT

GROUP: Final = "colo.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "ColoVM"
PLURAL: Final = "colovms"

FINALIZER: Final = "colo.dev/cleanup"

# Labels on everything the operator creates for a ColoVM.
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_VM: Final = "colo.dev/vm"
LABEL_ROLE: Final = "colo.dev/role"
MANAGED_BY: Final = "colo-operator"
APP_NAME: Final = "colo-agent"

ROLE_PRIMARY: Final = "primary"
ROLE_SECONDARY: Final = "secondary"

# `kubectl colo switchover NAME` writes a fresh value (a timestamp) here; the
# operator acts on a value once and remembers it in status.switchoverHandled.
ANNOTATION_SWITCHOVER: Final = "colo.dev/switchover"
# On agent pods: the pod's serial within its ColoVM (names never repeat).
ANNOTATION_SERIAL: Final = "colo.dev/serial"
# On agent pods: hash of the pod template they were created from (see manifests.template_hash).
ANNOTATION_TEMPLATE: Final = "colo.dev/template-hash"
# `kubectl colo restart NAME` writes a fresh value here; it is part of the template hash, so
# every agent pod is replaced by a rolling update.
ANNOTATION_RESTARTED_AT: Final = "colo.dev/restartedAt"
# `kubectl colo upgrade NAME` writes a fresh value here: under updateStrategy Manual it lets the
# rolling update to the current template start (acted on once, see status.upgradeHandled).
ANNOTATION_UPGRADE: Final = "colo.dev/upgrade"
# On the client Service: the annotation keys that came from spec.service.annotations, so a key
# removed from the spec is removed from the Service and annotations others wrote are left alone.
ANNOTATION_SERVICE_KEYS: Final = "colo.dev/service-annotations"

# Key of the per-VM Secret holding the agents' shared key / control API token.
SECRET_KEY: Final = "secret"


AGENT_CONTAINER: Final = "agent"
# The image's unprivileged user and group (Dockerfile), which agent pods run as.
AGENT_UID: Final = 65532

# The qemu backend's COLO connections, between the agent pods of one VM:
# mirror, compare (primary), migration, NBD (secondary). COLO_QEMU_PORTS.
QEMU_COLO_PORTS = (7711, 7712, 7713, 7714)
