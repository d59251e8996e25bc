"""The database layer of the management service: tables, sessions, Alembic migrations and small
repository functions. Services call it; routers never touch a session. SQLite and PostgreSQL run
through the same code."""
