"""srlm: Self-Rewarding Language Models on PyTorch Lightning.

    python main.py fit --config configs/m1_sft.yaml     # M1: SFT on IFT+EFT seed data
    python main.py fit --config configs/m2_dpo.yaml     # one DPO round on preference pairs
    python main.py loop                                 # the whole self-rewarding loop
    python main.py prepare-oasst --input F --output_dir D
    python main.py --help                               # every command, a line each (srlm/cli.py COMMANDS)

Every command takes --help; Lightning's (fit, validate, test, predict, loop) also --print_config.
"""

import logging

from srlm.allocator import reexec_tuned

if __name__ == "__main__":
    reexec_tuned()  # first, before anything is allocated: malloc settings that keep resident memory down
    from srlm.cli import main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
