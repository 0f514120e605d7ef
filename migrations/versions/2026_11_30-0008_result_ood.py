"""result out-of-distribution score (how unlike the model's training photos a photo is)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 20:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('results', sa.Column('ood', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('results', 'ood')
