"""host_memory: when an entry point restarts itself with glibc's huge-page malloc tunable, and that
the restart happens once, keeps the command line, and never happens inside another program."""

import os
import subprocess
import sys
import textwrap

import pytest

from dsv3_jax import host_memory

ENTRY = textwrap.dedent("""
    import os, sys
    from dsv3_jax import cli

    def main(argv):
        print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))
        print("ARGS=" + "|".join(argv[1:]))
        print("PID_CHANGED=" + str(os.getpid() != int(os.environ["START_PID"])))

    if __name__ == "__main__":
        os.environ.setdefault("START_PID", str(os.getpid()))
        cli.run(main)
""")


def test_restart_needed_only_on_glibc_235_with_thp_madvise_and_the_tunable_unset():
    ok = dict(glibc=(2, 36), mode="madvise")
    linux = sys.platform.startswith("linux")
    assert host_memory.restart_needed({}, **ok) is linux
    assert not host_memory.restart_needed({}, glibc=(2, 34), mode="madvise")  # no such tunable
    assert not host_memory.restart_needed({}, glibc=(2, 36), mode="always")  # THP already used
    assert not host_memory.restart_needed({}, glibc=(2, 36), mode="never")  # cannot help
    assert not host_memory.restart_needed({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **ok)
    assert not host_memory.restart_needed(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}, **ok)
    assert not host_memory.restart_needed({"DSV3_HUGE_PAGES": "0"}, **ok)
    # another tunable alone does not count as the setting
    assert host_memory.restart_needed({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **ok) is linux


def test_with_setting_keeps_the_other_tunables_and_the_environment():
    env = host_memory.with_setting({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert host_memory.with_setting({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert host_memory.tunable_set(env)


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"),
                                        ("garbage\n", None)])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert host_memory.thp_mode(str(path)) == mode
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def _run_entry(tmp_path, **env):
    (tmp_path / "entry_probe.py").write_text(ENTRY)
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DSV3_HUGE_PAGES")}
    base["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd()])
    out = subprocess.run([sys.executable, "-m", "entry_probe", "a", "b c"], capture_output=True,
                         text=True, env={**base, **env}, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def test_an_entry_point_restarts_once_with_the_tunable_and_its_arguments(tmp_path):
    if not host_memory.restart_needed({}):
        pytest.skip(f"this machine needs no restart (glibc {host_memory.glibc_version()}, "
                    f"THP {host_memory.thp_mode()})")
    seen = _run_entry(tmp_path)
    assert seen["TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert seen["ARGS"] == "a|b c"  # the same arguments, "b c" still one
    assert seen["PID_CHANGED"] == "False"  # execve keeps the process
    assert _run_entry(tmp_path, DSV3_HUGE_PAGES="0")["TUNABLES"] == ""  # the opt-out


def test_cli_run_restarts_only_a_main_defined_in_main(monkeypatch):
    """A test (or any caller) that runs an entry point's main through cli.run in its own process
    must not have that process replaced: only a main defined in __main__ (the process started as
    that entry point) asks for the restart."""
    from dsv3_jax import cli

    calls = []
    monkeypatch.setattr(host_memory, "prefer_huge_pages", lambda: calls.append(1))
    monkeypatch.setattr(cli, "_check_config_file", lambda argv: None)
    monkeypatch.setattr(cli.app, "run", lambda *args, **kwargs: None)

    def main(argv):
        pass

    cli.run(main)
    assert calls == []
    main.__module__ = "__main__"
    cli.run(main)
    assert calls == [1]
