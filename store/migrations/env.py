"""Alembic environment: runs on the connection store.db.Database.migrate hands in."""
from alembic import context

from store.tables import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters tables by copying them; later migrations need it there.
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
