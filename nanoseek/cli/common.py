"""What every command shares: one way to fail, and output that never truncates a number.

A user error (a bad flag, a malformed config, a corrupt checkpoint, an input that a library
function rejects with ValueError...) prints one line `error: ...` on stderr and exits with
code 2; a bug still shows its traceback. `--debug` or NANOSEEK_DEBUG=1 shows the traceback
of user errors too. This module imports neither torch nor rich: `nanoseek --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer
from typer.core import TyperGroup, TyperOption

try:  # typer 0.2x vendors click: its usage errors are typer._click's classes, not click's
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors

USER_ERROR_EXIT = 2
# error classes by module: a module not imported yet cannot have raised its error, so the
# check never imports torch for a calculator's error
USER_ERRORS = {
    "nanoseek.config": ("ConfigError",),
    "nanoseek.checkpoint.hf": ("CheckpointError",),
    "nanoseek.data.corpus": ("CorpusError",),
    "nanoseek.text.tokenizer": ("TokenizerError",),
    "nanoseek.train.pretrain": ("RunError",),
}
_debug = False


def set_debug(on: bool) -> None:
    global _debug
    _debug = on


def debugging() -> bool:
    return _debug or os.environ.get("NANOSEEK_DEBUG", "") not in ("", "0")


def is_user_error(e: BaseException) -> bool:
    """Errors in what the user gave (files, flags, values), as opposed to bugs."""
    if isinstance(e, (ValueError, OSError)):  # incl. UnicodeError, FileNotFoundError, JSONDecodeError
        return True
    for module, names in USER_ERRORS.items():
        mod = sys.modules.get(module)
        if mod is not None and isinstance(e, tuple(getattr(mod, n) for n in names)):
            return True
    return False


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str | BaseException) -> NoReturn:
    """Report a user error: one line on stderr, exit code 2."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(USER_ERROR_EXIT)


def _usage_message(e: click_errors.UsageError) -> str:
    where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    return one_line(e.format_message()) + where


class CliGroup(TyperGroup):
    """The root command group: catches every error of every command in one place."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        set_debug(False)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare `nanoseek calc`: the help
            typer.echo(e.ctx.get_help())
            code = 0
        except click_errors.UsageError as e:  # a bad flag or value: click's check or typer.BadParameter
            if debugging():
                raise
            typer.echo(f"error: {_usage_message(e)}", err=True)
            code = USER_ERROR_EXIT
        except click_errors.ClickException as e:
            typer.echo(f"error: {one_line(e.format_message())}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 1
        except Exception as e:
            if debugging() or not is_user_error(e):
                raise
            typer.echo(f"error: {one_line(e) or type(e).__name__}", err=True)
            code = USER_ERROR_EXIT
        sys.exit(code if isinstance(code, int) else 0)


def _flags_show_no_type() -> None:
    """typer prints `<bool>` beside every flag (--json, --help...), as if it took a value;
    a flag takes none, so its type column stays empty."""
    typed = TyperOption.display_type_rich
    if getattr(typed, "_nanoseek", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else typed(self, ctx)
    display_type_rich._nanoseek = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()


# ------------------------------------------------------------- input checks
def check_utf8(text: str, what: str) -> str:
    """Arguments that were not valid UTF-8 arrive as lone surrogates (Python's
    surrogateescape); a tokenizer would fail on them with a TypeError deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        bad = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        raise ValueError(f"{what}: not valid UTF-8 ({bad} at character {e.start})") from None
    return text


def check_device(device: str) -> str:
    """A torch device that exists on this machine (imports torch: call it in a command)."""
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    return device


# ------------------------------------------------------------------- output
def print_tables(*tables, stderr: bool = False) -> None:
    """Rich tables, never truncated: piped output (or a narrow terminal) gets the width each
    table needs rather than rich's 80-column default, which cut numbers to `9,994,2…`."""
    from rich.console import Console

    console = Console(stderr=stderr)
    for t in tables:  # measured unconstrained: measure() on an 80-column console says <= 80
        need = console.measure(t, options=console.options.update_width(1 << 14)).maximum
        if need > console.width:
            console = Console(stderr=stderr, width=need)
        console.print(t)


def load_config(preset_name: str | None = None, config_path: str | None = None):
    """The model commands' rule: exactly one of --preset NAME or --config FILE."""
    from nanoseek.config import ConfigError, ModelConfig, preset

    if (preset_name is None) == (config_path is None):
        raise ConfigError("give exactly one of --preset NAME or --config FILE")
    return preset(preset_name) if preset_name else ModelConfig.from_json(config_path)


# ------------------------------------------------------------------- dtypes
# One dtype vocabulary for every command: torch's and vLLM's names (auto, float32, bfloat16,
# float16) with the short forms fp32, bf16, fp16 accepted everywhere as aliases. fp8 is a
# value only where a command computes with it as a storage format (calc kv, plan capacity);
# FP8 weights are `--quantization fp8`. Each command lists the names it allows.
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_LONG = {short: long for long, short in DTYPE_SHORT.items()}
PRECISION_DTYPES = ("auto", "float32", "bfloat16", "float16")  # training: --precision
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # generate, serve, chat: --dtype
STORAGE_DTYPES = ("float32", "bfloat16", "float16", "fp8")  # calc kv, plan capacity
QUANTIZATIONS = ("fp8",)


def dtype_words(allowed: tuple[str, ...]) -> str:
    """'auto | float32 (fp32) | ...': the names a command allows, each with its alias."""
    return " | ".join(f"{a} ({DTYPE_SHORT[a]})" if a in DTYPE_SHORT else a for a in allowed)


def parse_dtype(value: str, allowed: tuple[str, ...], short: bool = False) -> str:
    """`value` (a name or its alias, any case) as its canonical name, or as the short form
    with `short` (what training's settings and the calculators store); else a ValueError
    naming the allowed values."""
    name = str(value).strip().lower()
    name = DTYPE_LONG.get(name, name)
    if name not in allowed:
        raise ValueError(f"{value!r} is not one of {dtype_words(allowed)}")
    return DTYPE_SHORT.get(name, name) if short else name


def dtype_callback(allowed: tuple[str, ...], short: bool = False):
    """A typer callback for a dtype option (one value or a repeated one): click's one-line
    error names the option, the value and the allowed names."""
    def check(value):
        if value is None:
            return None
        try:
            if isinstance(value, (list, tuple)):
                return [parse_dtype(v, allowed, short) for v in value]
            return parse_dtype(value, allowed, short)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return check


# --precision and --compile: the same choices for every training command (train/config.py
# PRECISIONS, COMPILE_MODES; repeated here so that `--help` does not import torch)
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "off", "on")
PRECISION_HELP = ("compute precision: auto (bf16 where the device has fast bf16: CUDA with bf16, a CPU "
                  "with AMX/AVX512-BF16; else fp32) | float32 (fp32) | bfloat16 (bf16) | float16 (fp16, "
                  "with a gradient scaler)")
COMPILE_HELP = "torch.compile of the blocks: auto (off: it does not pay on CPU; not measured on CUDA) | on | off"


def choice(values: tuple[str, ...]):
    """A typer callback: the value (if given) is one of `values`, else one line naming them."""
    def check(value):
        if value is not None and value not in values:
            raise typer.BadParameter(f"must be one of {' | '.join(values)}, got {value!r}")
        return value
    return check


def precision_option(default: str | None = None):
    """--precision for a training command; None = auto (or the run's own, on --resume)."""
    return typer.Option(default, "--precision", callback=dtype_callback(PRECISION_DTYPES, short=True),
                        help=PRECISION_HELP + ("" if default else " [default: auto]"))


def compile_option(default: str | None = None):
    return typer.Option(default, "--compile", callback=choice(COMPILE_CHOICES),
                        help=COMPILE_HELP + ("" if default else " [default: auto]"))


def precision_given(resume: bool, **options) -> dict:
    """The --precision / --compile values given (None: not given). On --resume none apply: a
    run keeps its own (its checkpoint holds that run's optimizer and gradient-scaler state),
    and a note on stderr says that they were ignored."""
    given = {k: v for k, v in options.items() if v is not None}
    if resume and given:
        typer.echo(f"note: --resume continues with the run's own settings; ignoring "
                   f"{', '.join('--' + k.replace('_', '-') for k in given)}", err=True)
        return {}
    return given


# --dtype and --quantization of the commands that load a checkpoint into the engine
# (generate, serve, chat): engine/dtype.py and quant/model.py check the values
ENGINE_DTYPE_HELP = (f"weights, activations and latent cache: {dtype_words(ENGINE_DTYPES)}; auto: the "
                     "checkpoint's torch_dtype; the router stays fp32")
QUANTIZATION_HELP = "fp8: attention and FFN/expert weights held in FP8 (128x128 blocks) and run through FP8Linear"


def dtype_option(default: str = "float32"):
    """--dtype of an engine command (a bad value: one ValueError line from engine/dtype.py)."""
    return typer.Option(default, "--dtype", callback=dtype_callback(ENGINE_DTYPES), help=ENGINE_DTYPE_HELP)


def quantization_option():
    return typer.Option(None, "--quantization", "-q", callback=dtype_callback(QUANTIZATIONS),
                        help=QUANTIZATION_HELP)


# ------------------------------------------------------ deprecated spellings
def deprecated_option(default, old: str, new: str, **kw):
    """A hidden old spelling of `new` that keeps scripts working and says, once, on stderr
    that it is deprecated (`pick` then merges it with the new option)."""
    def note(value):
        if value not in (None, False, [], ()):
            typer.echo(f"note: {old} is deprecated; use {new}", err=True)
        return value
    return typer.Option(default, old, hidden=True, callback=note, help=f"deprecated: use {new}", **kw)


def pick(new_value, old_value, new: str, old: str):
    """The value of an option given under its new or its old (deprecated) name, not both."""
    if old_value not in (None, False, [], ()):
        if new_value not in (None, False, [], ()) and new_value != old_value:
            raise typer.BadParameter(f"give {new} (or its old spelling {old}), not both")
        return old_value
    return new_value


def task_options(pairs: list[str]) -> dict:
    """KEY=VALUE -> {KEY: VALUE}, values read as JSON when they are (3, 0.5, null), else text."""
    import json
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
