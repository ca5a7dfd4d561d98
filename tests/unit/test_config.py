"""The cluster file: real YAML text through parse_config / load_config, defaults, and error reports.

Every problem of a file must be reported at once, each with its YAML path, its line and a hint, so an
operator fixes a file in one pass.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from safekit_cloud.core.config import ConfigError, load_config, parse_config

MINIMAL = """\
cluster:
  name: c1
nodes:
  - name: n1
    addresses: 198.18.0.1
  - name: n2
    addresses: 198.18.0.2
modules:
  - name: app
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "cluster.yaml")
    assert info.value.problems, "a ConfigError must list its problems"
    return info.value.problems


def only(problems: list[str], needle: str) -> str:
    """The one problem mentioning `needle`."""
    found = [p for p in problems if needle in p]
    assert len(found) == 1, f"{needle!r} in {problems}"
    return found[0]


# ---- a valid file ----------------------------------------------------------------------------------

def test_minimal_file_loads_with_documented_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.cluster.name == "c1"
    assert [n.name for n in cfg.nodes] == ["n1", "n2"]
    assert cfg.node("n1").addresses == {"default": "198.18.0.1"}  # a plain string: network `default`
    assert cfg.networks == ["default"]
    assert cfg.peer_of("n1").name == "n2"
    assert cfg.heartbeat.interval == 0.5
    assert cfg.heartbeat.timeout == 3.0
    assert cfg.heartbeat.port == 4800
    assert cfg.api.listen == "127.0.0.1:9010"
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 9010)
    module = cfg.module("app")
    assert module.mode == "mirror" and module.boot is True
    assert module.restart.limit == 3
    assert module.restart.window == 86400
    assert module.vip is None and module.checkers == [] and module.witnesses == []


def test_full_module_loads(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - name: app\n", textwrap.indent(textwrap.dedent("""\
        - name: app
          preferred_primary: n1
          vip:
            provider: lan
            address: 198.18.0.100/24
            interface: eth0
          checkers:
            - {name: web, type: http, url: "http://127.0.0.1:8080/"}
            - {name: port, type: tcp, port: 8080, action: stopstart}
          witnesses:
            - {type: tcp, address: 198.18.0.254, port: 22}
        """), "  "))
    cfg = parse_config(text)
    module = cfg.module("app")
    assert module.preferred_primary == "n1"
    assert module.vip is not None and module.vip.settings == {"interface": "eth0"}
    assert [c.type for c in module.checkers] == ["http", "tcp"]
    assert module.witnesses[0].port == 22


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(MINIMAL)
    assert load_config(path).cluster.name == "c1"


# ---- every error at once, with its path, line and hint ---------------------------------------------

def test_several_errors_are_all_reported_with_path_and_line() -> None:
    problems = problems_of("""\
        cluster:
          name: c1
        nodes:
          - name: n1
            addresses: 198.18.0.1
          - name: n2
            addresses: not-an-ip
        heartbeat:
          intervall: 1
        modules:
          - name: app
            checkers:
              - name: c1
                type: tcpp
                port: 80
        """)
    assert len(problems) == 3, problems
    address = only(problems, "nodes[1].addresses")
    assert address.startswith("nodes[1].addresses (line 7):")
    assert "'not-an-ip' is not an IPv4 or IPv6 address" in address
    unknown = only(problems, "heartbeat.intervall")
    assert unknown.startswith("heartbeat.intervall (line 9):")
    assert "check its spelling" in unknown
    checker = only(problems, "modules[0].checkers[0]")
    assert "(line 13)" in checker
    assert "'tcpp'" in checker and "process, tcp, http or command" in checker


def test_error_report_lists_the_file_and_count() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL.replace("198.18.0.2", "x"), "cluster.yaml")
    text = str(info.value)
    assert text.startswith("cluster.yaml: 1 problem(s):")
    assert "nodes[1].addresses (line 7)" in text


def test_missing_key_and_wrong_types_get_hints() -> None:
    problems = problems_of("""\
        cluster: {}
        nodes:
          - name: n1
            addresses: 198.18.0.1
          - name: n2
            addresses: 198.18.0.2
        heartbeat:
          port: eighty
        modules:
          - name: app
            boot: maybe
        """)
    assert "add this key" in only(problems, "cluster.name")
    assert "write a whole number" in only(problems, "heartbeat.port (line 8)")
    assert "write true or false" in only(problems, "modules[0].boot (line 11)")


def test_checker_without_type_is_told_to_add_one() -> None:
    problems = problems_of(MINIMAL + "    checkers:\n      - {name: c, port: 80}\n")
    assert "add `type:`" in only(problems, "modules[0].checkers[0]")


def test_timing_invariant_is_refused_with_what_to_change() -> None:
    problems = problems_of(MINIMAL + "heartbeat:\n  interval: 1\n  timeout: 2\n")
    problem = only(problems, "heartbeat")
    assert problem.startswith("heartbeat (line 10):")
    assert "less than 3 heartbeat intervals" in problem
    assert "raise timeout or lower interval" in problem


def test_fast_settings_within_the_invariant_are_accepted() -> None:
    cfg = parse_config(MINIMAL + "heartbeat:\n  interval: 0.1\n  timeout: 0.5\n")
    assert (cfg.heartbeat.interval, cfg.heartbeat.timeout) == (0.1, 0.5)


# ---- rules spanning sections -----------------------------------------------------------------------

def test_preferred_primary_must_be_a_node() -> None:
    problems = problems_of(MINIMAL + "    preferred_primary: n3\n")
    assert problems == ["modules[0].preferred_primary (line 10): 'n3' is not a node (['n1', 'n2'])"]


def test_field_errors_and_cross_section_errors_are_reported_together() -> None:
    """Pydantic skips model validators once a field is invalid: parse_config still runs the rules."""
    problems = problems_of(MINIMAL.replace("198.18.0.2", "bad-address") + "    preferred_primary: n3\n")
    assert len(problems) == 2, problems
    assert only(problems, "nodes[1].addresses").startswith("nodes[1].addresses (line 7):")
    assert only(problems, "preferred_primary").startswith("modules[0].preferred_primary (line 10):")


def test_field_errors_and_provider_errors_are_reported_together() -> None:
    problems = problems_of(MINIMAL.replace("198.18.0.2", "bad-address")
                           + "    vip: {provider: lan, address: 198.18.0.100/24}\n")
    assert len(problems) == 2, problems
    assert "interface" in only(problems, "modules[0].vip (line 10)")


def test_duplicate_node_names() -> None:
    problems = problems_of(MINIMAL.replace("name: n2", "name: n1"))
    assert only(problems, "nodes[1].name (line 6)").endswith(
        "'n1' is already the name of nodes[0]: node names must be unique")


def test_duplicate_module_names() -> None:
    problems = problems_of(MINIMAL + "  - name: app\n")
    assert only(problems, "modules[1].name (line 10)").endswith("module names must be unique")


def test_duplicate_checker_names() -> None:
    problems = problems_of(MINIMAL + "    checkers:\n      - {name: c, type: tcp, port: 1}\n"
                           "      - {name: c, type: tcp, port: 2}\n")
    problem = only(problems, "modules[0].checkers[1].name (line 12)")
    assert "checker names in a module must be unique" in problem


def test_nodes_on_different_heartbeat_networks() -> None:
    problems = problems_of(MINIMAL.replace(
        "addresses: 198.18.0.2", "addresses: {default: 198.18.0.2, backup: 198.19.0.2}"))
    problem = only(problems, "same heartbeat networks")
    assert problem.startswith("nodes (line 3):")
    assert "n1: ['default']" in problem and "n2: ['backup', 'default']" in problem


def test_replication_port_must_differ_from_heartbeat_port() -> None:
    problems = problems_of(MINIMAL + "    replication: {directories: [/srv/data], port: 4800}\n")
    assert "already used by heartbeat.port" in only(problems, "modules[0].replication.port (line 10)")


def test_several_rule_violations_each_get_their_own_line() -> None:
    problems = problems_of(MINIMAL.replace("name: n2", "name: n1") + "    preferred_primary: n3\n"
                           "  - name: app\n")
    assert len(problems) == 3, problems
    assert not any("(top level)" in p for p in problems)


# ---- virtual IP providers validate their own settings ----------------------------------------------

def test_lan_vip_without_interface() -> None:
    problems = problems_of(MINIMAL + "    vip:\n      provider: lan\n      address: 198.18.0.100/24\n")
    problem = only(problems, "modules[0].vip")
    assert problem.startswith("modules[0].vip (line 10):")
    assert "interface" in problem and "Field required" in problem


def test_lan_vip_per_node_interface_for_an_unknown_node() -> None:
    problems = problems_of(MINIMAL + "    vip: {provider: lan, address: 198.18.0.100/24, interface: eth0, "
                           "interfaces: {n3: eth1}}\n")
    assert "'n3' is not a node" in only(problems, "modules[0].vip")


def test_unknown_provider_names_the_known_ones() -> None:
    problems = problems_of(MINIMAL + "    vip: {provider: ovh, address: 198.18.0.100/24}\n")
    problem = only(problems, "modules[0].vip")
    assert "unknown provider 'ovh'" in problem
    for known in ("aws", "azure", "fake", "gcp", "lan"):
        assert known in problem


def test_vip_address_needs_a_prefix_or_gets_a_host_one() -> None:
    cfg = parse_config(MINIMAL + "    vip: {provider: lan, address: 198.18.0.100, interface: eth0}\n")
    assert cfg.module("app").vip.address == "198.18.0.100/32"  # type: ignore[union-attr]
    problems = problems_of(MINIMAL + "    vip: {provider: lan, address: nowhere, interface: eth0}\n")
    assert "not an address with prefix" in only(problems, "modules[0].vip.address")


# ---- environment overrides -------------------------------------------------------------------------

def test_env_override_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_HEARTBEAT__TIMEOUT", "5")
    cfg = parse_config(MINIMAL + "heartbeat:\n  timeout: 4\n")
    assert cfg.heartbeat.timeout == 5.0
    assert cfg.heartbeat.interval == 0.5  # the rest of the section is kept


def test_env_override_is_validated_like_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_HEARTBEAT__TIMEOUT", "1")  # < 3 x 0.5 s
    assert "less than 3 heartbeat intervals" in only(problems_of(MINIMAL), "heartbeat")


def test_unparsable_env_override_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_NODES", "not json")
    assert "environment" in only(problems_of(MINIMAL), "nodes")


# ---- unusable files ----------------------------------------------------------------------------------

def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "safekit-cloud init" in str(info.value)
    assert str(tmp_path / "absent.yaml") in str(info.value)


def test_non_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster: [unclosed\nnodes: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in info.value.problems[0]


@pytest.mark.parametrize("text", ["", "just a string\n", "- a\n- list\n"])
def test_yaml_that_is_not_a_mapping_is_a_config_error(text: str) -> None:
    assert "must be a YAML mapping" in problems_of(text)[0]


def test_replicated_directories_that_overlap_in_a_module_are_refused() -> None:
    problems = problems_of(MINIMAL + "    replication: {directories: [/srv/app, /srv/app/data]}\n")
    problem = only(problems, "modules[0].replication.directories")
    assert "/srv/app/data and /srv/app overlap: list the outer one only" in problem
    problems = problems_of(MINIMAL + "    replication: {directories: [/srv/app, /srv/app]}\n")
    assert "overlap" in only(problems, "modules[0].replication.directories")


def test_a_directory_replicated_by_two_modules_is_refused() -> None:
    problems = problems_of(MINIMAL + "    replication: {directories: [/srv/app]}\n"
                           "  - name: other\n    replication: {directories: [/srv/app/logs], port: 4802}\n")
    problem = only(problems, "modules[1].replication.directories")
    assert "/srv/app/logs overlaps /srv/app of modules[0]: a directory is replicated by one module only" in problem


@pytest.mark.parametrize("directory, why", [
    ("/", "cannot be replicated"), ("/proc/self", "cannot be replicated"), ("/dev", "cannot be replicated"),
    ("/srv/../etc", "has a '..' component"), ("srv/app", "is not an absolute path"),
])
def test_replicated_directories_that_cannot_be_replicated_are_refused(directory: str, why: str) -> None:
    problems = problems_of(MINIMAL + f"    replication: {{directories: [{directory}]}}\n")
    assert why in only(problems, "modules[0].replication.directories")
