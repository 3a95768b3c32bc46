from dflash_local.cli import app

app(prog_name="dflash")
