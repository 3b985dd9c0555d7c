"""Monitoring of served models: the captured traffic of a window (:mod:`.window`), its drift and quality against
the bundle's training baseline (:mod:`.drift`), and the report a person and a program read (:mod:`.report`)."""
