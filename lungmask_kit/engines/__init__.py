"""Engines: `local` (threads on one machine) and `ray` (Ray Data across machines) drive the same job units."""
