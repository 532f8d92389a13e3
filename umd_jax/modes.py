"""The modes of the command line, written once: cli.py's --mode flag and checks.py read them."""
MODES = ("pretrain", "finetune", "probe", "generate", "summary", "encode", "classify")
