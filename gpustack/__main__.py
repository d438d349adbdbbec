from gpustack.cli import entry

entry()
