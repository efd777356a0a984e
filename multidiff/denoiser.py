"""A network bound to its process and prediction kind: the object every sampler calls.

Samplers need one thing from a model: the clean-data estimate ``x0_hat(x_t, t)``. Any
object with a ``process`` attribute and ``__call__(x, t, space) -> x0_hat`` (``t`` a
per-item ``[B]`` tensor) will do; :class:`Denoiser` builds one from a raw network that
predicts ``eps``, ``x0``, ``v``, ``score``, ``velocity``, or is EDM-preconditioned.
Guidance wrappers (:mod:`multidiff.guidance`) and the analytic targets
(:mod:`multidiff.testing`) follow the same protocol.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from .prediction import EDMPreconditioning, check_prediction, to_x0
from .process import Process

__all__ = ["DataPredictor", "Denoiser", "TIME_INPUTS"]

TIME_INPUTS = ("t", "log_snr", "sigma", "step")


@runtime_checkable
class DataPredictor(Protocol):
    process: Process

    def __call__(self, x: Tensor, t: Tensor, space) -> Tensor: ...


class Denoiser:
    """``x0_hat(x, t) `` from a network ``net(x_in, time_in, **space.model_kwargs(), **cond)``.

    Args:
        net: the network; it gets the noisy state (scaled by ``c_in`` for ``"edm"``), a per-item
            time input and the Space's keyword arguments (``batch`` for graphs) plus ``cond``.
        process: the noise process the network was trained on.
        prediction: ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"velocity"`` or ``"edm"``
            (EDM preconditioning on ``x / alpha`` with ``sigma_data``).
        time_input: what the network receives as time: ``"t"`` (process time), ``"log_snr"``,
            ``"sigma"`` (``sigma / alpha``) or ``"step"`` (discrete DDPM step, 0-based). Ignored
            for ``"edm"``, whose time input is ``c_noise = log(sigma) / 4``.
        cond: keyword arguments passed to every network call (labels, properties, ...).
        autocast: run the network under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``);
            the sampler's arithmetic stays in the dtype of ``x``.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: Process,
        prediction: str = "eps",
        time_input: str = "t",
        sigma_data: float = 0.5,
        cond: dict[str, Any] | None = None,
        autocast: torch.dtype | None = None,
    ):
        self.net = net
        self.process = process
        self.prediction = check_prediction(prediction)
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {time_input!r}; valid: {', '.join(TIME_INPUTS)}")
        self.time_input = time_input
        self.precond = EDMPreconditioning(sigma_data)
        self.cond = dict(cond or {})
        self.autocast = autocast

    def with_condition(self, **cond: Any) -> "Denoiser":
        """A copy that passes ``cond`` (merged over the current one) to every network call."""
        return Denoiser(
            self.net, self.process, self.prediction, self.time_input, self.precond.sigma_data,
            {**self.cond, **cond}, self.autocast,
        )

    def _time(self, t: Tensor) -> Tensor:
        if self.time_input == "t":
            return t
        if self.time_input == "log_snr":
            return self.process.log_snr(t)
        if self.time_input == "sigma":
            return self.process.sigma_edm(t)
        step_of = getattr(self.process, "step_of", None)
        if step_of is None:
            raise ValueError(f"time_input='step' needs a discrete process, got {self.process!r}")
        return step_of(t)

    def _net(self, x: Tensor, time: Tensor, space, cond: dict) -> Tensor:
        kwargs = {**space.model_kwargs(), **cond}
        if self.autocast is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast):
                return self.net(x, time, **kwargs)
        return self.net(x, time, **kwargs)

    def __call__(self, x: Tensor, t: Tensor, space, **cond: Any) -> Tensor:
        cond = {**self.cond, **cond}
        p = self.process
        t64 = t.to(torch.float64)
        alpha = space.expand(p.alpha(t64)).to(x.dtype)
        sigma = space.expand(p.sigma(t64)).to(x.dtype)
        if self.prediction == "edm":
            s_edm = p.sigma_edm(t64).to(x.dtype)

            def net(x_in, c_noise, **kw):
                return self._net(x_in, c_noise, space, kw)

            return self.precond(net, x / alpha, s_edm, space.expand, **cond)
        out = self._net(x, self._time(t).to(x.dtype), space, cond).to(x.dtype)
        if self.prediction == "velocity":
            da, ds = p.derivatives(t64)
            return to_x0("velocity", out, x, alpha, sigma, space.expand(da).to(x.dtype), space.expand(ds).to(x.dtype))
        return to_x0(self.prediction, out, x, alpha, sigma)
