"""feature cache and training runs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 03:46:32.068618
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('training_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('base_version_id', sa.Integer(), nullable=True),
    sa.Column('candidate_version_id', sa.Integer(), nullable=True),
    sa.Column('counts', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('durations', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('decision', sa.String(length=1000), nullable=True),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status in ('running', 'promoted', 'rejected', 'failed', 'skipped', 'dry_run')", name=op.f('ck_training_runs_status')),
    sa.ForeignKeyConstraint(['base_version_id'], ['model_versions.id'], name=op.f('fk_training_runs_base_version_id_model_versions'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['candidate_version_id'], ['model_versions.id'], name=op.f('fk_training_runs_candidate_version_id_model_versions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_runs'))
    )
    op.create_table('image_features',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('region', sa.String(length=32), nullable=False),
    sa.Column('backbone_sha', sa.String(length=64), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_image_features_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_image_features')),
    sa.UniqueConstraint('image_id', 'region', 'backbone_sha', name=op.f('uq_image_features_image_id_region_backbone_sha'))
    )
    op.create_index(op.f('ix_image_features_backbone_sha'), 'image_features', ['backbone_sha'], unique=False)
    op.create_index(op.f('ix_image_features_image_id'), 'image_features', ['image_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_image_features_image_id'), table_name='image_features')
    op.drop_index(op.f('ix_image_features_backbone_sha'), table_name='image_features')
    op.drop_table('image_features')
    op.drop_table('training_runs')
