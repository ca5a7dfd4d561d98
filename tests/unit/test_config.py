"""The cluster file: real YAML text through parse_config / load_config, defaults, and error reports.

Every problem of a file must be reported at once, each with its YAML path, its line and a hint, so an
operator fixes a file in one pass.
"""

from __future__ import annotations

import textwrap
import time
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from safekit_cloud.core.config import ClusterConfig, ConfigError, Duration, load_config, parse_config
from safekit_cloud.core.replication.exclude import Excluder

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


def test_env_overrides_reach_into_lists_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs: every key can be overridden; SAFEKIT_MODULES__0__NAME=zz gave "modules: Input should be a
    valid list" (the variables' {"0": ...} replaced the file's list)."""
    monkeypatch.setenv("SAFEKIT_MODULES__0__NAME", "zz")
    monkeypatch.setenv("SAFEKIT_MODULES__0__WITNESSES__0__TIMEOUT", "2")
    monkeypatch.setenv("SAFEKIT_NODES__1__ADDRESSES__DEFAULT", "198.18.0.3")
    cfg = parse_config(MINIMAL + "    witnesses: [{address: 198.18.0.254}]\n    failback: true\n")
    assert [m.name for m in cfg.modules] == ["zz"] and cfg.modules[0].failback  # the rest of the item kept
    assert cfg.modules[0].witnesses[0].timeout == 2 and cfg.modules[0].witnesses[0].address == "198.18.0.254"
    assert cfg.node("n2").addresses == {"default": "198.18.0.3"} and cfg.node("n1").addresses["default"] == "198.18.0.1"


def test_an_env_override_of_a_list_item_is_validated_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_MODULES__0__WITNESSES__0__TIMEOUT", "inf")
    problem = only(problems_of(MINIMAL + "    witnesses: [{address: 198.18.0.254}]\n"), "witnesses")
    assert problem.startswith("modules[0].witnesses[0].timeout (from the environment variable "
                              "SAFEKIT_MODULES__0__WITNESSES__0__TIMEOUT): inf is not a finite number")


ADD_ITEM = ("a variable changes an item the file has (SAFEKIT_MODULES__0__NAME: the first module's name), it cannot "
            "add one: add it to the file, or set the whole list as JSON (SAFEKIT_MODULES='[...]')")


@pytest.mark.parametrize(("variable", "problem"), [
    ("SAFEKIT_MODULES__1__NAME", "modules (from the environment variable SAFEKIT_MODULES__1__NAME): '1' is not an "
                                 "index of this list, which has 1 item(s) in the file (indices: 0 to 0); " + ADD_ITEM),
    ("SAFEKIT_MODULES__APP__NAME", "modules (from the environment variable SAFEKIT_MODULES__APP__NAME): 'app' is not "
                                   "an index of this list, which has 1 item(s) in the file (indices: 0 to 0); "
                                   + ADD_ITEM),
    ("SAFEKIT_MODULES__0__CHECKERS__0__NAME",  # a list the file does not have
     "modules[0].checkers (line 9; overridden in part by SAFEKIT_MODULES__0__CHECKERS__0__NAME): Input should be a "
     "valid list (" + ADD_ITEM + ")"),
])
def test_an_env_index_the_file_does_not_have_is_a_clear_problem(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                                 problem: str) -> None:
    monkeypatch.setenv(variable, "web")
    assert problems_of(MINIMAL) == [problem]


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
    ("/srv/../etc", "has a '..' component"), ("srv/app", "'srv/app' must be an absolute path"),
    ('""', "'' must be an absolute path"),
])
def test_replicated_directories_that_cannot_be_replicated_are_refused(directory: str, why: str) -> None:
    problems = problems_of(MINIMAL + f"    replication: {{directories: [{directory}]}}\n")
    assert why in only(problems, "modules[0].replication.directories")



# ---- reading the file --------------------------------------------------------------------------------

def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_bytes(b"cluster:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: 1 problem(s):")
    assert info.value.problems == ["not UTF-8 text: byte 20 (line 2) is 0xe9: save the file as UTF-8"]


def test_a_yaml_syntax_error_names_the_file_line_and_column_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster: [unclosed\nnodes: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: 1 problem(s):")
    problem = info.value.problems[0]
    assert problem.startswith("line 2, column 6: not valid YAML: expected ',' or ']', but got ':' "
                              "(while parsing a flow sequence at line 1, column 10): fix the YAML there")
    assert "<unicode string>" not in str(info.value)


def test_a_character_yaml_refuses_is_located() -> None:
    problem = only(problems_of("cluster:\n  name: a\x00b\n"), "not valid YAML")
    assert problem.startswith("line 2, column 10: not valid YAML: character U+0000 is not allowed")
    assert "<unicode string>" not in problem


def test_a_key_given_twice_is_refused_naming_both_lines() -> None:
    problem = only(problems_of(MINIMAL + "cluster:\n  name: c2\n"), "given twice")
    assert problem == ("cluster (line 10): given twice in the same mapping, at line 1, column 1 and line 10, "
                       "column 1 (YAML would keep the last one only): remove one of them")
    problem = only(problems_of(MINIMAL.replace("  - name: app\n", "  - {name: app, name: other}\n")),
                   "given twice")
    assert problem.startswith("modules[0].name (line 9): given twice in the same mapping, at line 9, column 6 "
                              "and line 9, column 17")


def test_a_key_that_is_not_text_is_an_unknown_key_not_a_crash() -> None:
    assert only(problems_of(MINIMAL + "1: x\n"), "key 1").startswith("1 (line 10): key 1 is not a section name "
                                                                    "(unknown key")


def laughs(levels: int) -> str:
    """A "billion laughs": each level a list of 9 aliases of the level before, 9**levels strings in all."""
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return MINIMAL + "\n".join(lines) + "\n"


def merges(levels: int) -> str:
    """Merge keys that double at each level: `<<: [*m, *m]` copies the mapping twice, 2**levels pairs."""
    lines = ["m0: &m0 {k: 1}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}" for i in range(1, levels)]
    return MINIMAL + "\n".join(lines) + "\n"


ALIAS_BOMB = ("the aliases (*name) of this file expand it to more than 100000 values (a cluster file holds a few "
              "hundred): write the values out, or alias fewer nested ones")


# Before the check: 7 levels took 6 s and 1.1 GB, 8 levels 120 s and 9 GB, 24 levels of merges ran out of
# memory. The check counts each node once, so it is milliseconds whatever the size the aliases claim.
@pytest.mark.timeout(20)
@pytest.mark.parametrize("text", [laughs(7), laughs(8), laughs(40), merges(24)], ids=["9^7", "9^8", "9^40", "2^24"])
def test_an_alias_bomb_is_refused_at_once(text: str) -> None:
    started = time.monotonic()
    assert problems_of(text) == [ALIAS_BOMB]
    assert time.monotonic() - started < 5


def test_aliases_and_merges_of_a_real_file_still_work() -> None:
    text = MINIMAL + textwrap.indent(textwrap.dedent("""\
          checkers:
            - &web {name: web, type: http, url: "http://127.0.0.1/", interval: 2}
            - {<<: *web, name: web2}
          witnesses: [&w {address: 198.18.0.254}, {<<: *w, address: 198.18.0.253}]
        """), "    ")
    module = parse_config(text).module("app")
    assert [(c.name, c.interval) for c in module.checkers] == [("web", 2), ("web2", 2)]
    assert [w.address for w in module.witnesses] == ["198.18.0.254", "198.18.0.253"]
    assert ALIAS_BOMB not in problems_of(laughs(4))  # 9**4 values: unknown keys, but under the bound ...
    problems = problems_of(laughs(4) + "l9: &l9 [*l3, *l3]\nl10: [*l9, *l9, *l9, *l9, *l9, *l9, *l9, *l9]\n")
    assert problems == [ALIAS_BOMB]  # ... and just over it (16 * 9**4 > 100000)


@pytest.mark.parametrize(("text", "problem"), [
    # 5000 `[`: a RecursionError, "internal error"
    ("x: " + "[" * 5000 + "]" * 5000 + "\n",
     ("line 10, column 67: lists and mappings nested more than 64 deep: a cluster file needs a handful of levels; "
     "check the brackets and the indentation there")),
    # int() of more than 4300 digits: a ValueError, "internal error"
    ("heartbeat: {port: " + "9" * 5000 + "}\n",
     "line 10, column 19: a number of 5000 characters: no setting takes one that long; write the intended value"),
    # datetime(2024, 13, 1): a ValueError, "internal error"
    ("modules:\n  - name: 2024-13-01\n",
     ("line 11, column 11: '2024-13-01' cannot be read as a date (month must be in 1..12): quote it to make it "
     "text, or correct it")),
])
def test_yaml_python_cannot_hold_is_a_located_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(MINIMAL + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: 1 problem(s):")
    assert info.value.problems == [problem]


def test_a_port_of_thousands_of_digits_from_the_environment_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_HEARTBEAT__PORT", "9" * 5000)
    monkeypatch.setenv("SAFEKIT_API__LISTEN", "127.0.0.1:" + "9" * 5000)
    problems = problems_of(MINIMAL)
    assert only(problems, "heartbeat.port").startswith("heartbeat.port (from the environment variable "
                                                        "SAFEKIT_HEARTBEAT__PORT): Unable to parse")
    listen = only(problems, "api.listen")
    assert "is not host:port with a port from 1 to 65535" in listen and len(listen) < 300


# ---- paths -----------------------------------------------------------------------------------------------

def test_a_nul_byte_in_a_path_is_refused() -> None:
    problems = problems_of(MINIMAL + '    replication: {directories: ["/srv/da\\0ta"]}\n')
    assert only(problems, "NUL") == ("modules[0].replication.directories[0] (line 10): '/srv/da\\x00ta' holds a "
                                     "NUL byte: no file name can")


def test_the_same_directory_spelled_twice_overlaps() -> None:
    problems = problems_of(MINIMAL + '    replication: {directories: ["//srv/data", "/srv/data"]}\n')
    assert "/srv/data and /srv/data overlap" in only(problems, "modules[0].replication.directories (line 10)")
    problems = problems_of(MINIMAL + '    replication: {directories: ["//srv//data/"]}\n'
                           "  - name: other\n    replication: {directories: [/srv/data/logs], port: 4802}\n")
    assert "/srv/data/logs overlaps /srv/data of modules[0]" in only(problems, "modules[1].replication.directories")


def test_paths_are_stored_in_one_spelling() -> None:
    cfg = parse_config(MINIMAL + '    replication: {directories: ["//srv//data/"]}\n'
                                 '    scripts: {directory: "//etc/app/"}\n')
    assert cfg.module("app").replication.directories == [Path("/srv/data")]
    assert str(cfg.module("app").scripts.directory) == "/etc/app"


@pytest.mark.parametrize("value", ["relative/dir", '""'])
@pytest.mark.parametrize("section, where", [
    ("    scripts: {directory: %s}\n", "modules[0].scripts.directory (line 10)"),
    ("    checkers: [{name: p, type: process, pid_file: %s}]\n", "modules[0].checkers[0].pid_file (line 10)"),
    ("heartbeat: {key_file: %s}\n", "heartbeat.key_file (line 10)"),
    ("api: {token_file: %s}\n", "api.token_file (line 10)"),
    ("api: {tls: {cert_file: %s, key_file: /etc/k.pem}}\n", "api.tls.cert_file (line 10)"),
])
def test_file_and_directory_paths_must_be_absolute(section: str, where: str, value: str) -> None:
    problem = only(problems_of(MINIMAL + section % value), where)
    shown = "''" if value == '""' else repr(value)
    assert problem == (f"{where}: {shown} must be an absolute path (starting with /): the daemon's working "
                       "directory is arbitrary")


# ---- exclude patterns ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["", "/", "a/../b", "a//b"])
def test_exclude_patterns_the_excluder_refuses_are_refused_by_the_config(pattern: str) -> None:
    with pytest.raises(ValueError) as refused:
        Excluder([pattern])
    problem = only(problems_of(MINIMAL + f'    replication: {{directories: [/srv/data], exclude: ["{pattern}"]}}\n'),
                   "modules[0].replication.exclude (line 10)")
    assert problem.endswith(f": [0]: {refused.value}")  # the Excluder's own words


def test_an_absolute_exclude_pattern_under_the_directory_is_refused_with_the_relative_spelling() -> None:
    problems = problems_of(MINIMAL + '    replication: {directories: [/srv/data], '
                           'exclude: [/srv/data/tmp, "/srv/data/logs/*.gz", /srv/data]}\n')
    problem = only(problems, "modules[0].replication.exclude (line 10)")
    assert ("[0]: '/srv/data/tmp' is under /srv/data, but patterns are relative to the replicated directory: "
            "write /tmp (that path from its root) or tmp/ (every directory tmp)") in problem
    assert "[1]: '/srv/data/logs/*.gz' is under /srv/data" in problem and "write /logs/*.gz" in problem
    assert "[2]: '/srv/data' is the replicated directory itself" in problem


def test_anchored_exclude_patterns_stay_valid() -> None:
    cfg = parse_config(MINIMAL + '    replication: {directories: [/srv/data], exclude: [/cache, "cache/*.bin"]}\n')
    assert cfg.module("app").replication.exclude == ["/cache", "cache/*.bin"]


# ---- checkers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checker, where, message", [
    ('{name: h, type: http, url: "http://127.0.0.1/", body_regex: "(["}', "body_regex",
     "not a valid regular expression: unterminated character set at position 1"),
    ('{name: c, type: command, command: [""]}', "command", "the program (the first item) is empty"),
    ("{name: c, type: command, command: []}", "command", "List should have at least 1 item"),
    ('{name: t, type: tcp, host: "", port: 80}', "host", "'' is neither an IP address nor a host name"),
    ('{name: t, type: tcp, host: "-x", port: 80}', "host", "'-x' is neither an IP address nor a host name"),
    ('{name: h, type: http, url: "http://"}', "url", "'http://' has no host: write http://HOST[:PORT]/PATH"),
    ('{name: h, type: http, url: "http://h:99999/"}', "url", "the port must be a number from 1 to 65535"),
    ('{name: h, type: http, url: "http://h/a b"}', "url", "holds a space or a control character"),
])
def test_checker_settings_that_would_fail_at_run_time_are_refused(checker: str, where: str, message: str) -> None:
    problem = only(problems_of(MINIMAL + f"    checkers: [{checker}]\n"), "checkers[0]")
    assert problem.startswith(f"modules[0].checkers[0].{where} (line 10): ") and message in problem


def test_valid_checker_hosts_and_urls_are_accepted() -> None:
    cfg = parse_config(MINIMAL + "    checkers:\n"
                       "      - {name: a, type: http, url: 'http://[::1]:8080/health?x=1', body_regex: 'ok|up'}\n"
                       "      - {name: b, type: tcp, host: db.example.com, port: 5432}\n")
    assert [c.name for c in cfg.module("app").checkers] == ["a", "b"]


# ---- witnesses -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["-f", "", "not an address!!", "host-", "256.1.1.1"])
def test_a_witness_is_an_ip_address_or_a_host_name(address: str) -> None:
    problem = only(problems_of(MINIMAL + f'    witnesses: [{{address: "{address}"}}]\n'), "witnesses[0]")
    assert problem.startswith(f"modules[0].witnesses[0].address (line 10): {address!r} is neither an IP address "
                              "nor a host name")


def test_witness_host_names_and_addresses_are_accepted() -> None:
    cfg = parse_config(MINIMAL + "    witnesses: [{address: gw-1.example.com.}, {address: 198.18.0.254}, "
                                 "{address: 'fe80::1%eth0'}, {type: tcp, address: router, port: 22}, "
                                 "{address: db_primary.internal}]\n")
    assert len(cfg.module("app").witnesses) == 5


# ---- addresses -------------------------------------------------------------------------------------------

def vip(address: str) -> str:
    return f"    vip: {{provider: lan, address: '{address}', interface: eth0}}\n"


@pytest.mark.parametrize("address, why", [
    ("0.0.0.0/24", "0.0.0.0 is unspecified"), ("::/64", ":: is unspecified"),
    ("224.0.0.1/24", "224.0.0.1 is a multicast address"), ("127.0.0.2/8", "127.0.0.2 is a loopback address"),
    ("255.255.255.255", "255.255.255.255 is the broadcast address"),
    ("198.18.0.0/24", "198.18.0.0 is the network address of 198.18.0.0/24"),
    ("198.18.0.255/24", "198.18.0.255 is the broadcast address of 198.18.0.0/24"),
    ("2001:db8::/64", "2001:db8:: is the network address of 2001:db8::/64"),
])
def test_a_vip_must_be_a_usable_host_address(address: str, why: str) -> None:
    problem = only(problems_of(MINIMAL + vip(address)), "modules[0].vip.address")
    assert problem == (f"modules[0].vip.address (line 10): {why}: a virtual IP must be a host address clients "
                       "can reach (e.g. 198.18.0.100/24)")


def test_vips_of_point_to_point_and_host_prefixes_are_accepted() -> None:
    cfg = parse_config(MINIMAL + vip("198.18.0.10/31") + "  - name: b\n" + vip("198.18.0.20"))
    assert [m.vip.address for m in cfg.modules if m.vip] == ["198.18.0.10/31", "198.18.0.20/32"]


def test_a_vip_equal_to_a_node_address_is_refused() -> None:
    problem = only(problems_of(MINIMAL + vip("198.18.0.2/24")), "modules[0].vip.address")
    assert problem == ("modules[0].vip.address (line 10): 198.18.0.2 is the address of nodes[1]: a virtual IP "
                       "moves between the nodes, it needs an address of its own")


def test_two_modules_with_the_same_vip_are_refused() -> None:
    problem = only(problems_of(MINIMAL + vip("198.18.0.100/24") + "  - name: b\n" + vip("198.18.0.100/25")),
                   "modules[1].vip.address")
    assert problem == ("modules[1].vip.address (line 12): 198.18.0.100 is already the virtual IP of modules[0]: "
                       "each module needs its own (or make them one module)")


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "255.255.255.255", "224.0.0.5"])
def test_a_node_address_must_be_its_own(address: str) -> None:
    peer = "'2001:db8::1'" if ":" in address else "198.18.0.1"  # one IP version per network
    problem = only(problems_of(MINIMAL.replace("198.18.0.1", peer).replace("198.18.0.2", f"'{address}'")),
                   "nodes[1].addresses")
    assert problem.startswith(f"nodes[1].addresses (line 7): network 'default': {address} is not a node's own "
                              "address (unspecified, multicast or broadcast)")


def test_both_nodes_with_the_same_address_are_refused() -> None:
    problems = problems_of(MINIMAL.replace("198.18.0.2", "198.18.0.1"))
    assert problems == [("nodes[1].addresses.default (line 7): 198.18.0.1 is also the address of nodes[0] "
                        "(network 'default'): each node needs its own addresses")]


def test_ipv4_and_ipv6_on_one_heartbeat_network_are_refused() -> None:
    problems = problems_of(MINIMAL.replace("198.18.0.2", "2001:db8::2"))
    assert problems == [("nodes[1].addresses.default (line 7): 2001:db8::2 is IPv6 but nodes[0] has the IPv4 "
                        "address 198.18.0.1 on network 'default': both nodes of a heartbeat network need the "
                        "same IP version")]


# ---- ports -----------------------------------------------------------------------------------------------

def test_the_api_port_must_differ_from_replication_ports() -> None:
    problems = problems_of(MINIMAL + "    replication: {directories: [/srv/data]}\n"
                           'api: {listen: "0.0.0.0:4801"}\n')
    assert only(problems, "modules[0].replication.port") == (
        "modules[0].replication.port (line 10): port 4801 is already used by api.listen: each replicated module "
        "needs its own port, distinct from heartbeat.port and the api.listen port")


def test_two_replicated_modules_on_one_port_are_refused() -> None:
    problems = problems_of(MINIMAL + "    replication: {directories: [/srv/a]}\n"
                           "  - name: b\n    replication: {directories: [/srv/b]}\n")
    assert "port 4801 is already used by modules[0].replication.port" in only(problems, "modules[1].replication")


@pytest.mark.parametrize("listen, why", [
    ("not a host:59999", "'not a host' is neither an IP address nor a host name"),
    ("::1:59999", "'::1:59999': write an IPv6 address in brackets, as in [::1]:9010"),
    ("[localhost]:59999", "[localhost] is not an IPv6 address"),
    ("127.0.0.1:\u00b2", "'127.0.0.1:\u00b2' is not host:port"),
])
def test_the_api_host_must_be_an_address_or_a_host_name(listen: str, why: str) -> None:
    problem = only(problems_of(MINIMAL + f'api: {{listen: "{listen}"}}\n'), "api.listen")
    assert problem.startswith(f"api.listen (line 10): {why}")


def test_api_hosts_that_are_accepted() -> None:
    assert parse_config(MINIMAL + 'api: {listen: "[::1]:9010"}\n').api.host == "::1"
    assert parse_config(MINIMAL + 'api: {listen: "localhost:9010"}\n').api.host == "localhost"


def test_a_port_in_other_digits_is_an_error_not_a_crash() -> None:
    problems = problems_of(MINIMAL + 'heartbeat: {port: "\u00b2"}\n')
    assert "write a whole number" in only(problems, "heartbeat.port (line 10)")


# ---- errors caused by SAFEKIT_* variables --------------------------------------------------------------

def test_an_env_error_names_the_variable_not_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_HEARTBEAT__TIMEOUT", "abc")
    problems = problems_of(MINIMAL + "heartbeat:\n  interval: 0.5\n")
    assert problems == [("heartbeat.timeout (from the environment variable SAFEKIT_HEARTBEAT__TIMEOUT): Input "
                        "should be a valid number, unable to parse string as a number (write a number)")]


def test_an_env_error_in_a_json_section_names_that_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_MODULES", '[{"name": "a b"}]')
    problem = only(problems_of(MINIMAL), "modules[0].name")
    assert problem.startswith("modules[0].name (from the environment variable SAFEKIT_MODULES): ")


def test_a_rule_on_a_section_an_env_variable_changed_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_HEARTBEAT__TIMEOUT", "1")
    problem = only(problems_of(MINIMAL + "heartbeat:\n  interval: 0.5\n"), "heartbeat")
    assert problem.startswith("heartbeat (line 10; overridden in part by SAFEKIT_HEARTBEAT__TIMEOUT): timeout 1.0s")


def test_an_env_variable_that_is_not_json_is_named_and_said_to_need_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_NODES", "not json")
    problems = problems_of(MINIMAL)
    assert problems == [("nodes (from the environment variable SAFEKIT_NODES): not valid JSON (Expecting value, "
                        "character 1): a variable that sets a list or a whole section must hold JSON, e.g. "
                        "SAFEKIT_HEARTBEAT='{\"timeout\": 5}'; one key is set with SAFEKIT_<SECTION>__<KEY>=value")]


# ---- booleans where numbers go ----------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "read"), [
    ("port", "true", "true"), ("interval", "yes", "true"), ("timeout", "on", "true"), ("replay_window", "no", "false"),
])
def test_a_boolean_is_not_a_number(key: str, value: str, read: str) -> None:
    problem = only(problems_of(MINIMAL + f"heartbeat:\n  {key}: {value}\n"), "heartbeat")
    assert problem.startswith(f"heartbeat (line 10): {key}: {read} is a boolean, not a number (YAML reads yes, "
                              "no, on and off as booleans): write a number"), problem


def test_a_boolean_is_not_a_number_in_a_module_either() -> None:
    problem = only(problems_of(MINIMAL + "    replication: {directories: [/srv/data], port: yes}\n"),
                   "replication")
    assert "modules[0].replication (line 10): port: true is a boolean, not a number" in problem


def test_numbers_still_come_from_strings_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_HEARTBEAT__PORT", "4900")
    assert parse_config(MINIMAL).heartbeat.port == 4900


@pytest.mark.parametrize(("value", "kind"), [("no", "a boolean (yes, no, on, off, true, false)"),
                                             ("2024-01-01", "a date"), ("007", "a number")])
def test_a_name_yaml_reads_as_something_else_says_to_quote_it(value: str, kind: str) -> None:
    problem = only(problems_of(MINIMAL.replace("name: c1", f"name: {value}")), "cluster.name")
    assert problem == (f"cluster.name (line 2): Input should be a valid string (YAML read it as {kind}: write it "
                       "in quotes, e.g. name: 'no')")


@pytest.mark.parametrize(("setting", "words"), [
    ("process_name: /usr/sbin/nginx", "is not a process name: write the program's name as ps -o comm shows it"),
    ("process_name: ' '", "is not a process name"),
    ("cmdline_regex: ''", "matches any command line, so the check could never fail"),
    ("cmdline_regex: '.*'", "matches any command line, so the check could never fail"),
])
def test_a_process_checker_that_could_never_fail_or_never_pass_is_refused(setting: str, words: str) -> None:
    problem = only(problems_of(MINIMAL + f"    checkers:\n      - {{name: p, type: process, {setting}}}\n"),
                   "checkers[0]")
    assert words in problem


@pytest.mark.parametrize("directory", ["/etc", "/var/lib", "/usr", "/tmp", "/var//log/"])
def test_a_system_directory_is_not_replicated_but_its_subdirectories_are(directory: str) -> None:
    """Read-only on the secondary, its system could no longer write there; replaced at a failover."""
    problem = only(problems_of(MINIMAL + f"    replication: {{directories: ['{directory}']}}\n"), "replication")
    assert "is a system directory: replicated, it would be read-only on the secondary" in problem
    cfg = parse_config(MINIMAL + f"    replication: {{directories: ['{directory.rstrip('/')}/app']}}\n")
    assert cfg.module("app").replication.directories == [Path(directory.replace("//", "/").rstrip("/")) / "app"]


def test_every_unusable_directory_is_reported_at_once() -> None:
    problem = only(problems_of(MINIMAL + "    replication: {directories: [/proc/x, /sys, /etc, /srv/a, /srv/a/b]}\n"),
                   "replication")
    for words in ("/proc/x cannot be replicated", "/sys cannot be replicated", "/etc is a system directory",
                  "/srv/a/b and /srv/a overlap"):
        assert words in problem, words


# ---- durations ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "where", "message"), [
    # inf passed `config check`, then overflowed ping's -W (math.ceil) and aiohttp's timeout at run time
    ("witnesses: [{address: 198.18.0.254, timeout: .inf}]", "modules[0].witnesses[0].timeout (line 10)",
     "inf is not a finite number: write a number of seconds above 0, up to 60 (a minute)"),
    ("witnesses: [{address: 198.18.0.254, timeout: 2147484}]", "modules[0].witnesses[0].timeout (line 10)",
     "2147484 is out of range: write a number of seconds above 0, up to 60 (a minute)"),
    ("checkers: [{name: web, type: http, url: 'http://127.0.0.1/', timeout: .inf}]",
     "modules[0].checkers[0].timeout (line 10)",
     "inf is not a finite number: write a number of seconds above 0, up to 86400 (a day)"),
    ("checkers: [{name: p, type: tcp, port: 80, interval: 1e300}]", "modules[0].checkers[0].interval (line 10)",
     "1e+300 is out of range: write a number of seconds above 0, up to 86400 (a day)"),
    ("checkers: [{name: p, type: tcp, port: 80, start_delay: -1}]", "modules[0].checkers[0].start_delay (line 10)",
     "-1 is out of range: write a number of seconds from 0 up to 86400 (a day)"),
    ("scripts: {timeout: .nan}", "modules[0].scripts.timeout (line 10)", "nan is not a finite number"),
    ("scripts: {stop_timeout: 0}", "modules[0].scripts.stop_timeout (line 10)", "0 is out of range"),
    ("restart: {window: 1e300}", "modules[0].restart.window (line 10)",
     "1e+300 is out of range: write a number of seconds above 0, up to 604800 (a week)"),
    ("replication: {timeout: .inf}", "modules[0].replication.timeout (line 10)", "inf is not a finite number"),
    ("replication: {agent_timeout: .inf}", "modules[0].replication.agent_timeout (line 10)",
     "inf is not a finite number: write a number of seconds from 0 up to 86400 (a day)"),
    ("replication: {busy_poll_us: .nan}", "modules[0].replication.busy_poll_us (line 10)",
     "nan is not a finite number: write a number of microseconds from 0 up to 10000"),
    ("replication: {resync_bandwidth: .inf}", "modules[0].replication.resync_bandwidth (line 10)",
     "Input should be a finite number (write a number (not .inf nor .nan))"),
    ("startup_wait: .inf", "modules[0].startup_wait (line 10)", "inf is not a finite number"),
    ("vip: {provider: lan, address: 198.18.0.100/24, interface: eth0, garp_interval: .inf}", "modules[0].vip (line 10)",
     "garp_interval: inf is not a finite number: write a number of seconds above 0, up to 60 (a minute)"),
])
def test_a_duration_must_be_finite_and_within_its_range(setting: str, where: str, message: str) -> None:
    problem = only(problems_of(MINIMAL + f"    {setting}\n"), where.partition(" ")[0])
    assert problem.startswith(f"{where}: {message}"), problem


@pytest.mark.parametrize(("value", "message"), [
    (".nan", "nan is not a finite number: write a number of seconds from 0.1 up to 10"),  # not "less than 10"
    (".inf", "inf is not a finite number: write a number of seconds from 0.1 up to 10"),
    ("0.05", "0.05 is out of range: write a number of seconds from 0.1 up to 10"),
])
def test_heartbeat_interval_keeps_its_range_and_says_finite(value: str, message: str) -> None:
    assert only(problems_of(MINIMAL + f"heartbeat: {{interval: {value}}}\n"), "heartbeat") == \
        f"heartbeat.interval (line 10): {message}"


def test_a_duration_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEKIT_HEARTBEAT__TIMEOUT", "inf")
    assert only(problems_of(MINIMAL), "heartbeat") == (
        "heartbeat.timeout (from the environment variable SAFEKIT_HEARTBEAT__TIMEOUT): inf is not a finite "
        "number: write a number of seconds from 0.5 up to 120")


def test_durations_at_their_bounds_are_accepted() -> None:
    cfg = parse_config(MINIMAL + "    startup_wait: 0\n    restart: {window: 604800}\n"
                                 "    witnesses: [{address: 198.18.0.254, timeout: 60}]\n"
                                 "    replication: {agent_timeout: 0, busy_poll_us: 10000, timeout: 86400}\n")
    module = cfg.module("app")
    assert (module.startup_wait, module.restart.window, module.witnesses[0].timeout) == (0, 604800, 60)
    assert (module.replication.agent_timeout, module.replication.busy_poll_us) == (0, 10000)


def test_every_duration_field_has_a_range() -> None:
    """A new float setting in seconds must get a Duration (finite, bounded), or nan and inf pass again."""
    pending: list[type[BaseModel]] = [ClusterConfig]
    seen: set[type[BaseModel]] = set()
    floats = []
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            text = str(info.annotation)
            pending += [m for m in _models_in(info.annotation) if m not in seen]
            if "float" in text:
                floats.append((model.__name__, name))
                if name != "resync_bandwidth":  # MB/s, not a duration: finite only
                    assert any(isinstance(m, Duration) for m in info.metadata), (model.__name__, name)
    assert ("WitnessConfig", "timeout") in floats and ("HeartbeatConfig", "interval") in floats


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
