"""How many replicas serve a model: the deployment's ``replicas`` settings and the autoscaling policy.

The policy is Kubernetes' HPA rule over the balancer's in-flight requests: the replicas wanted are
``ceil(in_flight / target_in_flight)``, kept between ``min`` and ``max``. It does not flap: a scale-up happens
once every recommendation over the last ``scale_up_s`` seconds asked for more (it takes the smallest of them), a
scale-down once every recommendation over the last ``scale_down_s`` seconds asked for fewer (it takes the
largest), as the HPA's ``behavior.*.stabilizationWindowSeconds`` do.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

#: The most replicas one deployment may ask for (each is a process with its models in memory).
MAX_REPLICAS = 32


def _number(value: Any, field: str, low: float, high: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"replicas.{field} must be a number in [{low:g}, {high:g}] ({what}), found {value!r}")


@dataclass(frozen=True)
class ReplicaSettings:
    """The replica set of a served model and how it scales (the deployment file's ``replicas``)."""

    min: int = 1
    """Replicas that always run (at least 1)."""
    max: int = 1
    """Replicas the autoscaler may run at most; ``min == max`` turns autoscaling off."""
    target_in_flight: float = 8.0
    """In-flight requests per replica the autoscaler aims at (read from the balancer every second)."""
    scale_up_s: float = 3.0
    """Seconds the load must ask for more replicas before one is added."""
    scale_down_s: float = 30.0
    """Seconds the load must ask for fewer replicas before one is drained and stopped."""
    drain_timeout_s: float = 30.0
    """The longest a replica being removed is given to finish its in-flight requests."""
    cpus: int = 1
    """CPU cores each replica leases from the pool (and is pinned to)."""
    pool: str = "local"
    """The resource pool the replicas lease their cores from (``KILN_POOLS_FILE``; ``local``: this machine)."""
    image: str | None = None
    """Run each replica as a container of this serve image (``docker/serve.Dockerfile``) on the engine of the node
    it leased; ``None``: a process on this host."""

    def __post_init__(self) -> None:
        for name in ("min", "max", "cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"replicas.{name} must be a whole number, found {value!r}")
        if not 1 <= self.min <= MAX_REPLICAS or not 1 <= self.max <= MAX_REPLICAS:
            raise ValueError(f"replicas.min and replicas.max must be in [1, {MAX_REPLICAS}], found min {self.min}, "
                             f"max {self.max}")
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) is above replicas.max ({self.max}); raise max or lower min "
                             "(min == max: a fixed number of replicas)")
        if not 1 <= self.cpus <= 256:
            raise ValueError(f"replicas.cpus must be in [1, 256] (cores leased per replica), found {self.cpus}")
        _number(self.target_in_flight, "target_in_flight", 0.5, 10_000, "in-flight requests per replica")
        _number(self.scale_up_s, "scale_up_s", 0, 3600, "seconds of load before a scale-up")
        _number(self.scale_down_s, "scale_down_s", 0, 86_400, "seconds of calm before a scale-down")
        _number(self.drain_timeout_s, "drain_timeout_s", 0, 3600, "seconds a removed replica may finish in")
        if not isinstance(self.pool, str) or not self.pool.strip():
            raise ValueError(f"replicas.pool must name a resource pool, found {self.pool!r}")
        if self.image is not None and (not isinstance(self.image, str) or not self.image.strip()
                                       or any(c.isspace() for c in self.image) or len(self.image) > 512):
            raise ValueError(f"replicas.image must be an image reference such as kiln-serve:cpu (or null: "
                             f"processes), found {self.image!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ReplicaSettings:
        """Parse ``{"min": 1, "max": 3, ...}`` (every key optional).

        Raises:
            ValueError: not an object, an unknown key or an invalid value; the message names the field.
        """
        if not isinstance(data, dict):
            raise ValueError(f'replicas must be an object such as {{"min": 1, "max": 2}}, found {data!r}')
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"replicas.{unknown[0]} is not a known field (allowed: {', '.join(sorted(known))})")
        return cls(**data)


class Autoscaler:
    """The replica count the load asks for, stabilised (see the module docstring).

    Args:
        settings: min, max, target and the two windows.
    """

    def __init__(self, settings: ReplicaSettings):
        self.settings = settings
        self._history: deque[tuple[float, int]] = deque()

    def recommend(self, in_flight: float) -> int:
        """The replicas ``in_flight`` requests ask for, between min and max, before stabilisation."""
        s = self.settings
        wanted = math.ceil(max(0.0, in_flight) / s.target_in_flight)
        return max(s.min, min(s.max, wanted))

    def decide(self, now: float, in_flight: float, current: int) -> int:
        """The replica count to run now, given ``in_flight`` requests across the ``current`` replicas.

        Args:
            now: a monotonic time in seconds; calls come in increasing order.
            in_flight: requests being served or queued at the balancer, all replicas together.
            current: replicas running now.

        Returns:
            ``current`` unless the load asked for another count over the whole of the matching window.
        """
        s = self.settings
        self._history.append((now, self.recommend(in_flight)))
        horizon = max(s.scale_up_s, s.scale_down_s)
        while len(self._history) > 1 and self._history[1][0] <= now - horizon:
            self._history.popleft()
        clamped = max(s.min, min(s.max, current))
        if clamped != current:
            return clamped
        up = self._settled(now, s.scale_up_s, min)
        if up is not None and up > current:
            return up
        down = self._settled(now, s.scale_down_s, max)
        if down is not None and down < current:
            return down
        return current

    def _settled(self, now: float, window: float, pick: Any) -> int | None:
        """``pick`` (min or max) of the recommendations over the last ``window`` seconds; ``None`` until the
        history covers that window."""
        if not self._history or self._history[0][0] > now - window:
            return None
        since = now - window
        # The newest sample at or before the window's start counts: it held over the window's first moment.
        start = max((i for i, (t, _) in enumerate(self._history) if t <= since), default=0)
        return int(pick(r for _, r in list(self._history)[start:]))
