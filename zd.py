"""zd — a from-scratch reference implementation of the ZeroDiffusion recipe: Stable Diffusion 1.5 fine-tuned into a
v-prediction, zero-terminal-SNR model.

    python zd.py --help            the subcommands, one line each
    python zd.py COMMAND --help    the flags of one

Each subcommand is a plain function taking the parsed arguments, so a notebook can call it too.
"""
import argparse


def main(argv=None):
    p = argparse.ArgumentParser(prog="zd.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
