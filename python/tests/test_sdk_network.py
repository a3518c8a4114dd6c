"""A sandbox's network in the SDK: the nat mode's policy and published ports (against the fake daemon)."""

import pytest
from fake_daemon import SANDBOX, Reply

import deltabox

SB = f"/v1/sandboxes/{SANDBOX['id']}"
NETWORK = {
    "mode": "nat",
    "address": "10.89.0.2",
    "gateway": "10.89.0.1",
    "interface": "dbx0",
    "egress": {"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]},
    "ports": [{"port": 8000, "host_address": "127.0.0.1", "host_port": 40000}],
}


def test_create_with_nat_and_an_egress_policy(fake):
    fake.route("POST", "/v1/sandboxes", Reply(201, dict(SANDBOX, network="nat", address="10.89.0.2")))
    sb = fake.client.create("debian", network="nat", allow_out=["pypi.org"], deny_out=["0.0.0.0/0"])
    assert fake.requests[-1].json() == {
        "image": "debian",
        "network": "nat",
        "egress": {"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]},
    }
    assert (sb.info.network, sb.info.address) == ("nat", "10.89.0.2")


def test_network_and_a_policy_change(fake, sandbox):
    fake.route("GET", f"{SB}/network", Reply(200, NETWORK))
    net = sandbox.network()
    assert (net.mode, net.address, net.gateway, net.interface) == ("nat", "10.89.0.2", "10.89.0.1", "dbx0")
    assert (net.allow_out, net.deny_out) == (["pypi.org"], ["0.0.0.0/0"])
    assert net.ports == [deltabox.PublishedPort(port=8000, host_address="127.0.0.1", host_port=40000)]
    fake.route("PUT", f"{SB}/network", Reply(200, dict(NETWORK, egress={"allow_out": [], "deny_out": []})))
    net = sandbox.set_egress()
    assert fake.requests[-1].json() == {"allow_out": [], "deny_out": []}
    assert (net.allow_out, net.deny_out) == ([], [])


def test_publish_and_unpublish_a_port(fake, sandbox):
    fake.route("POST", f"{SB}/ports", Reply(201, {"port": 8000, "host_address": "0.0.0.0", "host_port": 8080}))
    p = sandbox.publish_port(8000, host_port=8080, host_address="0.0.0.0")
    assert fake.requests[-1].json() == {"port": 8000, "host_port": 8080, "host_address": "0.0.0.0"}
    assert (p.port, p.host_address, p.host_port) == (8000, "0.0.0.0", 8080)
    fake.route("DELETE", f"{SB}/ports/8000", Reply(200, {"port": 8000, "removed": True}))
    sandbox.unpublish_port(8000)
    assert fake.requests[-1].method == "DELETE"


def test_network_errors_are_typed(fake, sandbox):
    fake.route("POST", f"{SB}/ports", Reply(409, {"error": "port_unavailable", "message": "in use"}))
    with pytest.raises(deltabox.Conflict) as e:
        sandbox.publish_port(8000, host_port=22)
    assert e.value.code == "port_unavailable"
