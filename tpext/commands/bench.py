"""`tpext bench`: not implemented yet."""


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise SystemExit("tpext bench: not implemented yet")
