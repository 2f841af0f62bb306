"""Command-side tables for jobs: idempotency keys of submissions.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per (user, Idempotency-Key): the job the key created, and a digest of
    # the request, so the same key with another body is refused, not confused.
    op.execute(
        """
        CREATE TABLE job_idempotency_keys (
            owner_id uuid NOT NULL,
            idempotency_key text NOT NULL,
            job_id uuid NOT NULL,
            request_digest text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (owner_id, idempotency_key)
        )
        """
    )
    op.execute(
        "CREATE INDEX job_idempotency_keys_created_at_idx"
        " ON job_idempotency_keys (created_at)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE job_idempotency_keys")
