"""The analysts SQL reports (data package `pipeline.sql`; see pipeline/reports.py)."""
