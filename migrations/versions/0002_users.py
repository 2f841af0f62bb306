"""Command-side tables for users: credentials, email reservations, PII keys.

None of these is a read model, and none is rebuilt from the log: they hold what
the log must never hold (password hashes, encryption keys) and what a command must
check atomically with its append (email uniqueness, the representation version
behind ETag / If-Match).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row an account. `representation_version` is the stream version of the
    # last event that changed what GET shows (sign-ins do not), the ETag's source.
    # `tokens_valid_after` ends tokens issued before a delete or deactivation.
    op.execute(
        """
        CREATE TABLE user_credentials (
            user_id uuid PRIMARY KEY,
            password_hash text NOT NULL,
            is_active boolean NOT NULL DEFAULT true,
            is_superuser boolean NOT NULL DEFAULT false,
            representation_version integer NOT NULL,
            tokens_valid_after timestamptz,
            erased_at timestamptz,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # Normalised email -> account. The primary key makes the second of two
    # concurrent registrations fail inside its own transaction, so its events
    # never commit. Erasure deletes the row: the address is PII too.
    op.execute(
        """
        CREATE TABLE user_email_reservations (
            email text PRIMARY KEY,
            user_id uuid NOT NULL REFERENCES user_credentials (user_id)
                ON DELETE CASCADE
        )
        """
    )
    op.execute(
        "CREATE UNIQUE INDEX user_email_reservations_user_id_idx"
        " ON user_email_reservations (user_id)"
    )
    # The key that encrypts a user's PII inside the log. Erasure deletes the row;
    # the ciphertext left in the immutable log can never be read again.
    op.execute(
        """
        CREATE TABLE user_keys (
            user_id uuid PRIMARY KEY,
            key bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE user_keys")
    op.execute("DROP TABLE user_email_reservations")
    op.execute("DROP TABLE user_credentials")
