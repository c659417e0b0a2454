"""The privacy-mode table: for every `privacy.mode`, who adds noise, which Flower wrapper / client mod it needs, the mechanism.

This is the ONLY place that compares `privacy.mode` strings; everything else asks the table
(`privacy_mode(name).local`, `.central`, `.server_wrapper`, ...). Wrappers and mods are named, not
imported (common/ never imports Flower's app wiring): server/ and client/ resolve the names in
`flwr.serverapp.strategy` and `flwr.clientapp.mod`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyMode:
    """One privacy mode: its kind, Flower's server-side wrapper and client mod (names), the mechanism text."""

    name: str
    kind: str  # "off", "local" (DP-SGD at every site) or "central" (Flower's wrapper around the strategy)
    mechanism: str
    server_wrapper: str = ""  # class in flwr.serverapp.strategy
    client_mod: str = ""  # function in flwr.clientapp.mod
    adaptive: bool = False  # central adaptive clipping (Andrew et al. 2021)

    @property
    def private(self) -> bool:
        """Any differential privacy: the DP-compatible model is built on server and sites."""
        return self.kind != "off"

    @property
    def local(self) -> bool:
        """DP-SGD at every site (Opacus), with a per-site ledger."""
        return self.kind == "local"

    @property
    def central(self) -> bool:
        """Central DP through one of Flower's strategy wrappers."""
        return self.kind == "central"


_FIXED = "central DP, {side}-side fixed clipping (McMahan et al. 2018), site-level"
_ADAPTIVE = "central DP, {side}-side adaptive clipping (Andrew et al. 2021), site-level"

PRIVACY_MODES: dict[str, PrivacyMode] = {
    "off": PrivacyMode("off", "off", "none"),
    "local": PrivacyMode(
        "local", "local", "DP-SGD (Abadi et al. 2016): per-sample clipping + Gaussian noise, Opacus, example-level"
    ),
    "central-fixed-server": PrivacyMode(
        "central-fixed-server", "central", _FIXED.format(side="server"), "DifferentialPrivacyServerSideFixedClipping"
    ),
    "central-fixed-client": PrivacyMode(
        "central-fixed-client", "central", _FIXED.format(side="client"), "DifferentialPrivacyClientSideFixedClipping",
        "fixedclipping_mod",
    ),
    "central-adaptive-server": PrivacyMode(
        "central-adaptive-server", "central", _ADAPTIVE.format(side="server"),
        "DifferentialPrivacyServerSideAdaptiveClipping", adaptive=True,
    ),
    "central-adaptive-client": PrivacyMode(
        "central-adaptive-client", "central", _ADAPTIVE.format(side="client"),
        "DifferentialPrivacyClientSideAdaptiveClipping", "adaptiveclipping_mod", adaptive=True,
    ),
}


def privacy_mode(name: str) -> PrivacyMode:
    """The table entry of a privacy.mode value (validated by the configuration)."""
    try:
        return PRIVACY_MODES[name]
    except KeyError:
        raise KeyError(f"unknown privacy.mode '{name}' (choose from {', '.join(PRIVACY_MODES)})") from None
