"""case external id (the Phenopacket id a case was imported from)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 17:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('cases', sa.Column('external_id', sa.String(length=128), nullable=True))
    op.create_unique_constraint(op.f('uq_cases_owner_id_external_id'), 'cases', ['owner_id', 'external_id'])


def downgrade() -> None:
    op.drop_constraint(op.f('uq_cases_owner_id_external_id'), 'cases', type_='unique')
    op.drop_column('cases', 'external_id')
