"""The application: typed recipes and their checks, problem builders, the runner, the run
directory and what it holds (exports, plots), the command line and the quickstart."""
