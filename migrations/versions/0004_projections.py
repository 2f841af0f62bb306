"""Projection state: which generation of read tables is live, and which is building.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row a projection. Its live checkpoint is the `checkpoints` row of the same
    # name; a generation being rebuilt keeps its own, named "<name>@g<generation>".
    # `event_types` lets readers outside the projectors tell when a projection has
    # nothing left to do before a position (read-your-writes, lag).
    op.execute(
        """
        CREATE TABLE projection_state (
            name text PRIMARY KEY,
            live_generation integer NOT NULL DEFAULT 1,
            schema_hash text NOT NULL,
            event_types text[] NOT NULL DEFAULT '{}',
            building_generation integer,
            building_schema_hash text,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE projection_state")
