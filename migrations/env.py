"""Alembic environment: the generic one, run on a connection the caller passes in.

``store.db.upgrade`` passes its connection through ``config.attributes["connection"]`` (the
usual alembic recipe), so upgrades share the caller's transaction and locks.  Plain ``alembic``
command lines work too, with the URL from ``-x url=...`` or $WORKITEM_STORE_URL.
"""

from alembic import context
from sqlalchemy import create_engine

from store.schema import metadata

config = context.config


def run(connection):
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    from store.db import resolve_url

    engine = create_engine(resolve_url(context.get_x_argument(as_dictionary=True).get("url")))
    with engine.begin() as conn:
        run(conn)
