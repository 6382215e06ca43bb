"""The instance metadata service (169.254.169.254): a sandbox network that reaches the host's
is refused at start unless the config decides it, and named missing wherever it is reachable."""

from __future__ import annotations

import pytest

from nanogrid.common.config import from_dict
from nanogrid.common.errors import ConfigError
from nanogrid.runners.docker.engine import container_isolation
from nanogrid.runners.isolation import Isolation, check_metadata_service, metadata_exposure
from nanogrid.runners.process import runner as process


@pytest.mark.parametrize(("runner", "network"), [("process", "host"), ("docker", "bridge")])
def test_a_network_that_reaches_the_hosts_needs_a_decision(runner: str, network: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_metadata_service(runner, network, None)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{runner}.metadata_service: must be blocked or allowed when "
                              f"{runner}.network is {network}: functions could reach the "
                              "instance metadata service (169.254.169.254)")
    for setting in ("blocked", "allowed"):
        check_metadata_service(runner, network, setting)
    check_metadata_service(runner, "none", None)


def test_only_blocked_keeps_it_off_the_missing_list() -> None:
    assert metadata_exposure("process", "blocked", "any") == {}
    assert metadata_exposure("process", None, "no network namespace") == {
        "metadata service": "functions can reach 169.254.169.254: no network namespace"}
    assert metadata_exposure("docker", "allowed", "any") == {
        "metadata service": "functions can reach 169.254.169.254: docker.metadata_service is "
                            "allowed"}


def test_a_network_namespace_the_kernel_refuses_names_the_metadata_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """process.network none, but the probe found the namespace refused (a unit without
    ``net`` in RestrictNamespaces): the [ISOLATION] warning at start says so."""
    refused = "the kernel refused the namespace: Operation not permitted"
    monkeypatch.setattr(process, "probe_namespaces", lambda config: Isolation(
        ("mount", "ipc", "pid"), {"network": refused}))
    monkeypatch.setattr(process.os, "geteuid", lambda: 0)
    found = process.ProcessRunner.isolation(from_dict({"runner": "process"}))
    assert found.missing["metadata service"] == (
        f"functions can reach 169.254.169.254: sandboxes share the host's network ({refused})")
    warning = found.warning("process")
    assert warning is not None and "metadata service (functions can reach" in warning


def test_docker_names_it_for_a_network_other_than_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nanogrid.runners.docker.engine.engine_info", lambda: None)
    bridge = container_isolation(from_dict({"docker": {"network": "bridge"}}))
    assert "metadata service" in bridge.missing and "ipc" in bridge.holds
    blocked = container_isolation(
        from_dict({"docker": {"network": "bridge", "metadata_service": "blocked"}}))
    assert "metadata service" not in blocked.missing
    assert "metadata service" not in container_isolation(from_dict({})).missing
