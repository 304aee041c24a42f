"""Shell completion and the manual page, made from the parser.

Each completion script is loaded into the real shell (bash, zsh, fish:
.ci/run installs zsh and fish) and asked to complete; the manual page is
rendered by groff with warnings on.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from p2pbackup.cli.main import build_parser
from p2pbackup.cli.shell import manual_page

from .cli_helpers import cli_ok


def _script(tmp_path: Path, shell: str) -> Path:
    path = tmp_path / f"p2pbackup.{shell}"
    path.write_text(cli_ok("completion", shell, home=tmp_path / "unused").stdout)
    return path


def _shell(name: str) -> str:
    found = shutil.which(name)
    assert found is not None, f"{name} is needed (.ci/run installs it: apt-get install {name})"
    return found


def _bash_completes(script: Path, words: list[str]) -> list[str]:
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        'COMP_LINE="${COMP_WORDS[*]}"\nCOMP_POINT=${#COMP_LINE}\n'
        "_shtab_p2pbackup\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        [_shell("bash"), "-c", program], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_bash_completes_commands_subcommands_and_new_flags(tmp_path: Path) -> None:
    script = _script(tmp_path, "bash")
    assert "backup" in _bash_completes(script, ["p2pbackup", "ba"])
    assert set(_bash_completes(script, ["p2pbackup", "friend", ""])) >= {"add", "list", "remove"}
    flags = _bash_completes(script, ["p2pbackup", "backup", "--lim"])
    assert set(flags) == {"--limit-upload", "--limit-download"}
    assert _bash_completes(script, ["p2pbackup", "completion", ""]) == ["bash", "zsh", "fish"]


def test_fish_completes_commands_and_flags(tmp_path: Path) -> None:
    script = _script(tmp_path, "fish")

    def complete(line: str) -> list[str]:
        done = subprocess.run(
            [_shell("fish"), "--no-config", "-c", f"source {script}; complete -C '{line}'"],
            capture_output=True,
            text=True,
            check=True,
        )
        return [entry.split("\t")[0] for entry in done.stdout.splitlines()]

    assert "backup" in complete("p2pbackup ba")
    assert {"--limit-upload", "--limit-download"} <= set(complete("p2pbackup restore --lim"))


def test_zsh_loads_the_script_with_every_command_and_flag(tmp_path: Path) -> None:
    script = _script(tmp_path, "zsh")
    program = (
        "autoload -Uz compinit && compinit -u -D\n"
        f"source {script}\n"
        "print -l -- $_shtab_p2pbackup_backup_options\n"
        "whence -w _shtab_p2pbackup\n"
    )
    done = subprocess.run(
        [_shell("zsh"), "-f", "-c", program], capture_output=True, text=True, check=True
    )
    assert "_shtab_p2pbackup: function" in done.stdout
    assert "--limit-upload" in done.stdout and "--exclude" in done.stdout


def _every_command(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                name = f"{prefix} {choice.dest}".strip()
                names.append(name)
                names += _every_command(action._name_parser_map[choice.dest], name)
    return names


def test_the_manual_page_names_every_command_and_renders_without_warnings(
    tmp_path: Path,
) -> None:
    page = cli_ok("man", home=tmp_path / "unused").stdout
    assert page.startswith(".TH P2PBACKUP 1 ")
    commands = _every_command(build_parser())
    assert {"backup", "friend add", "sim durability", "completion", "man"} <= set(commands)
    for name in commands:
        assert f".SS {name.replace('-', chr(92) + '-')}\n" in page, name
    assert r"\fB\-\-limit\-upload\fR \fIKIB\fR" in page
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is needed to render the page (apt-get install groff-base)")
    rendered = subprocess.run(
        [groff, "-man", "-ww", "-Tutf8"],
        input=page,
        capture_output=True,
        text=True,
        check=True,
    )
    assert rendered.stderr == ""
    assert "restore a snapshot into a directory" in rendered.stdout


def test_help_that_looks_like_roff_is_escaped() -> None:
    parser = argparse.ArgumentParser(prog="p2pbackup", description=".starts with a dot")
    sub = parser.add_subparsers()
    p = sub.add_parser("x", help="'quoted and \\ backslashed")
    p.add_argument("--flag", help=".dot")
    page = manual_page(parser)
    assert "\n.dot" not in page and "\n'quoted" not in page
    assert "\\e backslashed" in page


def test_every_flag_and_argument_has_help() -> None:
    def missing(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action._name_parser_map.items():
                    found += missing(sub, f"{prefix} {name}".strip())
            elif not action.help and not isinstance(action, argparse._HelpAction):
                found.append(f"{prefix}: {'/'.join(action.option_strings) or action.dest}")
        return found

    assert missing(build_parser()) == []
