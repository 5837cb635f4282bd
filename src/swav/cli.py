"""`swav COMMAND [config=NAME] [overrides...]`: one entry point, one subcommand per task."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from swav.errors import guarded


def _wait_passively() -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the user chose a wait policy.

    GNU OpenMP (torch's, on Linux) spins a waiting thread for a while before it sleeps. On an idle
    machine that costs nothing, but beside any other busy process (a browser, a neighbour's job)
    the spinning thread takes the core from the thread it waits for, and a 2-core machine trained
    at half its speed or less. Read when the OpenMP library loads, so this runs before torch is
    imported (the command line imports it later), and only by `main`: a library user keeps control
    of their process.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


USAGE = """\
usage: swav COMMAND [config=NAME] [+config/GROUP=OPTION ...] [config.KEY=VALUE ...]

commands:
  train     pretrain (with no config= it runs the built-in quickstart)
  config    print the composed, validated and inferred config as YAML (--list: the packaged configs)
  extract   trunk features (+ labels, paths) of DATA.TRAIN / DATA.TEST into CHECKPOINT.DIR/features/
  knn       weighted kNN (k 20 and 200, T 0.1) of trunk features -> knn.json
  linear    linear classifier on the frozen trunk (A.3 / A.5; EVAL.LINEAR.FAST: precomputed features) -> linear.json
  semisup   fine-tune with 1 % / 10 % of the labels (A.4) -> semisup.json
  svm       per-class linear SVMs: mAP (VOC07, A.5), low-shot -> svm.json
  export    swav export CHECKPOINT OUT.pth: the trunk as a torchvision-style state dict
  report    an HTML page about a run: curves, evaluation results, cluster gallery
            (swav report RUN_DIR [--output PATH] [--num-images N] [--no-gallery]);
            several runs' kNN top-1 against training minutes on one plot
            (swav report RUN_DIR RUN_DIR2 ... [--label NAME ...] [--output PATH])

examples:
  swav train
  swav train config=pretrain/swav/swav_8node_resnet config.LOSS.swav_loss.epsilon=0.04
  swav train config=pretrain/swav/swav_8node_resnet +config/pretrain/swav/models=resnet101
  swav config config=my_experiment.yaml config.OPTIMIZER.num_epochs=100
  swav knn config=benchmark/knn/knn_cifar10 config.MODEL.WEIGHTS_INIT.PARAMS_FILE=RUN/model_final_checkpoint.torch
  swav report ./checkpoints/swav_cifar10_resnet18 ./checkpoints/simclr_cifar10_resnet18
"""

# Commands that live in their own modules: name -> "module:function", the function takes the
# arguments after the command name and returns the exit code. Imported only when called.
EXTRA_COMMANDS: dict[str, str] = {
    "extract": "swav.eval.commands:extract_main",
    "knn": "swav.eval.commands:knn_main",
    "linear": "swav.eval.commands:linear_main",
    "semisup": "swav.eval.commands:semisup_main",
    "svm": "swav.eval.commands:svm_main",
    "export": "swav.eval.commands:export_main",
    "report": "swav.report:main",
}


def _parser(command: str) -> argparse.ArgumentParser:
    # argparse %-formats its usage text (for %(prog)s), so a literal "%" must be doubled.
    parser = argparse.ArgumentParser(prog=f"swav {command}", usage=USAGE.replace("%", "%%"))
    parser.add_argument("overrides", nargs="*", help="config=NAME, +config/GROUP=OPTION, config.KEY=VALUE")
    if command == "config":
        parser.add_argument("--list", action="store_true", help="list the packaged configs and exit")
    return parser


def _train_or_config(command: str, rest: list[str]) -> int:
    args = _parser(command).parse_args(rest)
    # Imported here so `swav --help` answers instantly.
    from swav.config import available_configs, load_config, to_yaml

    if command == "config" and args.list:
        print("\n".join(available_configs()))
        return 0
    if command == "config":
        print(to_yaml(load_config(args.overrides)), end="")
        return 0
    from swav.launch import train_command

    return train_command(args.overrides, on_summary=print_summary)


def print_summary(summary: dict) -> None:
    """The end of a training run on the console: the kNN scores when the monitor ran."""
    knn = summary.get("knn")
    if knn:
        lines = [f"kNN top-1 on the held-out images (k={knn['k']}, T={knn['temperature']}):"]
        lines += [f"  {name.replace('_', ' '):12s} {knn[name]['top1']:6.2f} %" for name in ("trained", "random_init") if name in knn]
        print("\n".join(lines) + f"\n(also in {summary['run_dir']}/knn.json)")


def main(argv: list[str] | None = None) -> int:
    _wait_passively()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("train", "config"):
        return guarded(lambda: _train_or_config(command, rest))
    if command in EXTRA_COMMANDS:
        module_name, function_name = EXTRA_COMMANDS[command].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        return guarded(lambda: function(rest))
    print(f"swav: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
