"""`python -m fastlayers {train,summary,bench} ...` (also the `fastlayers` script)."""
import argparse
import sys

COMMANDS = {
    "train": ("fastlayers.train", "train an image classifier (LeNet-5 on MNIST-5k by default)"),
    "summary": ("fastlayers.summary", "print a model's layers, output shapes and parameters"),
    "bench": ("fastlayers.bench", "benchmark fastlayers against torch.nn"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m fastlayers",
        description="fastlayers: torch.nn's Linear, Conv2d, MaxPool2d and BatchNorm2d on "
                    "our own kernels. Run a subcommand with -h for its options.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            parser.exit(2, f"\nunknown command {argv[0]!r}\n")
        parser.print_help()
        return 0
    import importlib
    module = importlib.import_module(COMMANDS[argv[0]][0])  # imported lazily
    rc = module.main(argv[1:])
    return 0 if rc is None else rc


if __name__ == "__main__":
    sys.exit(main())
