"""The event store: events, its immutability and wake-up triggers, checkpoints.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE events (
            position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
            stream_id text NOT NULL,
            category text NOT NULL,
            version integer NOT NULL CHECK (version > 0),
            event_id uuid NOT NULL,
            type text NOT NULL,
            schema_version integer NOT NULL DEFAULT 1,
            data jsonb NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
            recorded_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT events_event_id_key UNIQUE (event_id),
            CONSTRAINT events_stream_id_version_key UNIQUE (stream_id, version)
        )
        """
    )
    # The order every reader of the whole log follows (see shared/event_store.py).
    op.execute("CREATE INDEX events_log_order_idx ON events (transaction_id, position)")
    op.execute(
        "CREATE INDEX events_category_position_idx ON events (category, position)"
    )
    op.execute("CREATE INDEX events_type_position_idx ON events (type, position)")
    op.execute(
        "CREATE INDEX events_correlation_id_idx"
        " ON events ((metadata->>'correlation_id'))"
    )
    op.execute("CREATE INDEX events_actor_id_idx ON events ((metadata->>'actor_id'))")
    op.execute("CREATE INDEX events_recorded_at_idx ON events (recorded_at)")

    # The log is immutable whatever a client does; erasure destroys keys instead.
    op.execute(
        """
        CREATE FUNCTION events_refuse_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'events are immutable: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER events_immutable_rows BEFORE UPDATE OR DELETE ON events"
        " FOR EACH ROW EXECUTE FUNCTION events_refuse_change()"
    )
    op.execute(
        "CREATE TRIGGER events_immutable_table BEFORE TRUNCATE ON events"
        " FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change()"
    )

    # No NOTIFY trigger: a NOTIFY inside the appending transaction takes
    # PostgreSQL's global notify lock until commit, which serialises every
    # writer's commit. Appenders send the wake-up after commit instead
    # (shared/log_listener.py, CommitNotifier).

    op.execute(
        """
        CREATE TABLE checkpoints (
            name text PRIMARY KEY,
            transaction_id xid8 NOT NULL DEFAULT '0'::xid8,
            position bigint NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE checkpoints")
    op.execute("DROP TABLE events")
    op.execute("DROP FUNCTION events_refuse_change()")
