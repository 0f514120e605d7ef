"""syndrome catalogue and case phenotype

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 05:35:24.433163
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hpo_terms',
    sa.Column('id', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('synonyms', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hpo_terms'))
    )
    op.add_column('cases', sa.Column('ancestry', sa.String(length=64), nullable=True))
    op.add_column('cases', sa.Column('hpo_terms', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False))
    op.add_column('syndromes', sa.Column('orpha', sa.String(length=32), nullable=True))
    op.add_column('syndromes', sa.Column('source', sa.String(length=16), server_default='local', nullable=False))
    op.create_unique_constraint(op.f('uq_syndromes_omim'), 'syndromes', ['omim'])
    op.create_unique_constraint(op.f('uq_syndromes_orpha'), 'syndromes', ['orpha'])
    op.create_check_constraint(op.f('ck_syndromes_source'), 'syndromes', "source in ('local', 'omim', 'orpha')")


def downgrade() -> None:
    op.drop_constraint(op.f('ck_syndromes_source'), 'syndromes', type_='check')
    op.drop_constraint(op.f('uq_syndromes_orpha'), 'syndromes', type_='unique')
    op.drop_constraint(op.f('uq_syndromes_omim'), 'syndromes', type_='unique')
    op.drop_column('syndromes', 'source')
    op.drop_column('syndromes', 'orpha')
    op.drop_column('cases', 'hpo_terms')
    op.drop_column('cases', 'ancestry')
    op.drop_table('hpo_terms')
