"""Templates and static files of the pages (installed as the package `dqm_daemon.web`)."""
