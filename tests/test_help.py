"""Every command's arguments are explained, with their defaults, in --help."""

import argparse
import re

import pytest

from dass.cli import COMPRESSED_FORMAT, build_parser

#: Arguments whose help is checked by a test of their own below.
ELSEWHERE: set[str] = set()


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in action.choices.items() if name not in ("bench", "generate")}  # they parse their own options


def flat(text):
    """Help text on one line, with words that argparse broke at a hyphen joined again."""
    return re.sub(r"(?<=\w-) ", "", " ".join(text.split()))


def arguments(p):
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        name = a.option_strings[0] if a.option_strings else a.dest
        if name not in ELSEWHERE:
            yield name, a


def test_the_commands_are_all_here():
    assert set(subparsers()) == {"prune", "eval", "verify", "compare", "compress"}


@pytest.mark.parametrize("command", ["prune", "eval", "verify", "compare", "compress"])
def test_every_argument_has_help(command):
    p = subparsers()[command]
    missing = [name for name, a in arguments(p) if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not missing, f"dass {command}: no help for {missing}"


@pytest.mark.parametrize("command", ["prune", "eval", "verify", "compare", "compress"])
def test_every_default_is_shown(command):
    p = subparsers()[command]
    text = flat(p.format_help())
    for name, a in arguments(p):
        if a.default is None or a.default is False or not a.option_strings:
            continue  # "not given": the help says in words what happens then
        assert f"(default: {a.default})" in text, f"dass {command} {name}: default {a.default!r} not shown"


def test_calibration_and_window_defaults_visible():
    helps = {c: flat(p.format_help()) for c, p in subparsers().items()}
    assert "--nsamples NSAMPLES calibration sequences; the paper uses 128 (default: 128)" in helps["prune"]
    assert re.search(r"--seqlen SEQLEN .*?\(default: 2048\)", helps["prune"])
    assert re.search(r"--eval-seqlen EVAL_SEQLEN .*?\(default: 2048\)", helps["eval"])
    assert re.search(r"--eval-tokens EVAL_TOKENS .*?\(default: 16384\)", helps["compare"])
    assert re.search(r"--seed SEED .*?\(default: 0\)", helps["prune"])  # a falsy default is still shown


def test_compressed_format_described_the_same_everywhere():
    top = flat(build_parser().format_help())
    prune = flat(subparsers()["prune"].format_help())
    assert COMPRESSED_FORMAT in top and COMPRESSED_FORMAT in prune
    assert "one-bit-per-weight mask" in COMPRESSED_FORMAT
    assert "indices" not in top and "bitmask" not in prune


def test_help_exits_cleanly(capsys):
    from dass.cli import main

    for argv in (["--help"], ["verify", "--help"], ["compress", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "dir" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_every_method_listed_with_its_options_and_real_defaults(command):
    """The list comes from the options objects: a method or option added there shows up."""
    from dataclasses import fields

    from dass.methods import available_methods, method_class
    from dass.run.reconstruct import ReconstructOptions

    text = subparsers()[command].format_help()
    for name in available_methods():
        cls = method_class(name)
        assert f"  {name} " in text and cls.summary in text, name
        for f in fields(cls.Options):
            assert f"{f.name}=" in text, (name, f.name)
    assert "alpha=0.5 " in text  # DaSS's default, the paper's
    assert "alpha=1.0 " in text  # dass-obs's default differs, and help says so
    assert "rescale=down with alpha=auto, else none" in text
    for f in fields(ReconstructOptions):
        assert f"{f.name}={f.default}".lower() in text.lower(), f.name
