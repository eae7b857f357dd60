"""The DICOM listener's source-network allowlist on a dual-stack socket (``MSGATE_DICOM__HOST=::``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dicom_helpers import running_listener
from pynetdicom import AE

pytestmark = [pytest.mark.integration]


def _echo(port: int) -> tuple[bool, bool]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
    established, rejected = assoc.is_established, assoc.is_rejected
    if established:
        assoc.release()
    return established, rejected


@pytest.mark.parametrize("networks,allowed", [('["127.0.0.0/8"]', True),
                                              ('["10.0.0.0/8", "::1/128"]', False)])
def test_dual_stack_listener_matches_ipv4_peers_against_ipv4_networks(tmp_path: Path, networks: str,
                                                                      allowed: bool) -> None:
    """An IPv4 peer of a listener bound to ``::`` arrives as ``::ffff:127.0.0.1``; it used to match no
    IPv4 network, so every allowed IPv4 sender was rejected."""
    env = {"MSGATE_DICOM__HOST": "::", "MSGATE_DICOM__ALLOWED_NETWORKS": networks}
    with running_listener(tmp_path, **env) as listener:
        assert _echo(listener.port) == (allowed, not allowed)
        assert listener.alive
