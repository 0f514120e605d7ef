"""face provenance, rotation, quality and measurements

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 05:40:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('faces', sa.Column('weights', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False))
    op.add_column('faces', sa.Column('rotation', sa.Float(), server_default=sa.text('0'), nullable=False))
    op.add_column('faces', sa.Column('quality', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('faces', sa.Column('measurements', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('faces', 'measurements')
    op.drop_column('faces', 'quality')
    op.drop_column('faces', 'rotation')
    op.drop_column('faces', 'weights')
