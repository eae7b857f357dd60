"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import msgate.storage.models

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('association',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('calling_aet', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('peer_host', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('started_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('ended_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('instances', sa.Integer(), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('association', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_association_calling_aet'), ['calling_aet'], unique=False)
        batch_op.create_index(batch_op.f('ix_association_started_at'), ['started_at'], unique=False)

    op.create_table('audit_event',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('ts', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('prev_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_event_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_event_subject'), ['subject'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_event_ts'), ['ts'], unique=False)

    op.create_table('audit_head',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('blob',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('backend', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('kek_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('stored_size', sa.Integer(), nullable=False),
    sa.Column('created_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('purged_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('blob', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blob_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_blob_kek_id'), ['kek_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_blob_kind'), ['kind'], unique=False)

    op.create_table('blob_chunk',
    sa.Column('blob_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('blob_id', 'seq')
    )
    op.create_table('data_key',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('kek_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('wrapped', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('data_key', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_data_key_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_key_kek_id'), ['kek_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_key_purpose'), ['purpose'], unique=False)

    op.create_table('patient',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name_enc', sa.LargeBinary(), nullable=True),
    sa.Column('birth_date_enc', sa.LargeBinary(), nullable=True),
    sa.Column('sex_enc', sa.LargeBinary(), nullable=True),
    sa.Column('merged_into_id', sa.Integer(), nullable=True),
    sa.Column('created_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['merged_into_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patient_created_at'), ['created_at'], unique=False)

    op.create_table('hl7_message',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dedup_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('control_id_enc', sa.LargeBinary(), nullable=True),
    sa.Column('sending_application', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sending_facility', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('message_type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('trigger', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('blob_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('received_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('ack_code', sqlmodel.sql.sqltypes.AutoString(length=4), nullable=True),
    sa.Column('ack_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('validation', sa.JSON(), nullable=False),
    sa.Column('mapping_state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('mapping_error', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('duplicates', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blob.id'], ),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dedup_index')
    )
    with op.batch_alter_table('hl7_message', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hl7_message_mapping_state'), ['mapping_state'], unique=False)
        batch_op.create_index(batch_op.f('ix_hl7_message_message_type'), ['message_type'], unique=False)
        batch_op.create_index(batch_op.f('ix_hl7_message_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hl7_message_received_at'), ['received_at'], unique=False)

    op.create_table('patient_identifier',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('id_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('value_enc', sa.LargeBinary(), nullable=True),
    sa.Column('authority', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('id_type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('id_index')
    )
    with op.batch_alter_table('patient_identifier', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patient_identifier_patient_id'), ['patient_id'], unique=False)

    op.create_table('study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('study_uid_enc', sa.LargeBinary(), nullable=True),
    sa.Column('accession_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('accession_enc', sa.LargeBinary(), nullable=True),
    sa.Column('dicom_patient_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('patient_id_enc', sa.LargeBinary(), nullable=True),
    sa.Column('patient_name_enc', sa.LargeBinary(), nullable=True),
    sa.Column('patient_birth_date_enc', sa.LargeBinary(), nullable=True),
    sa.Column('patient_sex_enc', sa.LargeBinary(), nullable=True),
    sa.Column('study_date_enc', sa.LargeBinary(), nullable=True),
    sa.Column('study_description_enc', sa.LargeBinary(), nullable=True),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('modalities', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('route', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('calling_aet', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('first_received_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('ready_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('runs', sa.Integer(), nullable=False),
    sa.Column('delivered_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('purged_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_uid_index')
    )
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_accession_index'), ['accession_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_dicom_patient_index'), ['dicom_patient_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_first_received_at'), ['first_received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_last_received_at'), ['last_received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_state'), ['state'], unique=False)

    op.create_table('job',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('idem_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('model_version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('flags', sa.JSON(), nullable=False),
    sa.Column('stages', sa.JSON(), nullable=False),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('supersedes_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('published_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('started_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idem_key')
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_study_id'), ['study_id'], unique=False)

    op.create_table('observation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('feature', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('code_system', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('value_enc', sa.LargeBinary(), nullable=True),
    sa.Column('value_type', sqlmodel.sql.sqltypes.AutoString(length=4), nullable=False),
    sa.Column('unit', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=2), nullable=False),
    sa.Column('observed_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('withdrawn', sa.Boolean(), nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['hl7_message.id'], ),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('observation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_observation_feature'), ['feature'], unique=False)
        batch_op.create_index(batch_op.f('ix_observation_observed_at'), ['observed_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_observation_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_observation_updated_at'), ['updated_at'], unique=False)

    op.create_table('order_',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('accession_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('accession_enc', sa.LargeBinary(), nullable=True),
    sa.Column('placer_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('placer_enc', sa.LargeBinary(), nullable=True),
    sa.Column('filler_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('filler_enc', sa.LargeBinary(), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('procedure_code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('ordered_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.Column('message_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['hl7_message.id'], ),
    sa.ForeignKeyConstraint(['patient_id'], ['patient.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('order_', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_order__accession_index'), ['accession_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_order__filler_index'), ['filler_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_order__patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_order__placer_index'), ['placer_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_order__updated_at'), ['updated_at'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('series_uid_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('series_uid_enc', sa.LargeBinary(), nullable=True),
    sa.Column('modality', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('description_enc', sa.LargeBinary(), nullable=True),
    sa.Column('protocol_enc', sa.LargeBinary(), nullable=True),
    sa.Column('sequence_name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('image_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('scanning_sequence', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('inversion_time', sa.Float(), nullable=True),
    sa.Column('body_part', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('first_received_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_uid_index')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_first_received_at'), ['first_received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_study_id'), ['study_id'], unique=False)

    op.create_table('instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('sop_uid_index', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sop_uid_enc', sa.LargeBinary(), nullable=True),
    sa.Column('sop_class_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('transfer_syntax', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('blob_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('content_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('current', sa.Boolean(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('calling_aet', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('assoc_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('received_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blob.id'], ),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_uid_index', 'version')
    )
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instance_assoc_id'), ['assoc_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_instance_received_at'), ['received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_instance_series_id'), ['series_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_instance_sop_uid_index'), ['sop_uid_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_instance_study_id'), ['study_id'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('job_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('destination', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('blob_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('created_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['blob_id'], ['blob.id'], ),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_state'), ['state'], unique=False)

    op.create_table('result',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('blob_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blob.id'], ),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id')
    )
    with op.batch_alter_table('result', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_created_at'), ['created_at'], unique=False)

    op.create_table('outbox_attempt',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('entry_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('started_at', msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('peer_status', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('detail', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.ForeignKeyConstraint(['entry_id'], ['outbox.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outbox_attempt', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_attempt_entry_id'), ['entry_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_attempt_started_at'), ['started_at'], unique=False)

    op.bulk_insert(sa.table('audit_head', sa.column('id', sa.Integer), sa.column('seq', sa.Integer),
                            sa.column('hash', sa.String)), [{'id': 1, 'seq': 0, 'hash': '0' * 64}])


def downgrade() -> None:
    with op.batch_alter_table('outbox_attempt', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_attempt_started_at'))
        batch_op.drop_index(batch_op.f('ix_outbox_attempt_entry_id'))

    op.drop_table('outbox_attempt')
    with op.batch_alter_table('result', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_created_at'))

    op.drop_table('result')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_state'))
        batch_op.drop_index(batch_op.f('ix_outbox_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_outbox_job_id'))
        batch_op.drop_index(batch_op.f('ix_outbox_created_at'))

    op.drop_table('outbox')
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_study_id'))
        batch_op.drop_index(batch_op.f('ix_instance_sop_uid_index'))
        batch_op.drop_index(batch_op.f('ix_instance_series_id'))
        batch_op.drop_index(batch_op.f('ix_instance_received_at'))
        batch_op.drop_index(batch_op.f('ix_instance_assoc_id'))

    op.drop_table('instance')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_id'))
        batch_op.drop_index(batch_op.f('ix_series_first_received_at'))

    op.drop_table('series')
    with op.batch_alter_table('order_', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_order__updated_at'))
        batch_op.drop_index(batch_op.f('ix_order__placer_index'))
        batch_op.drop_index(batch_op.f('ix_order__patient_id'))
        batch_op.drop_index(batch_op.f('ix_order__filler_index'))
        batch_op.drop_index(batch_op.f('ix_order__accession_index'))

    op.drop_table('order_')
    with op.batch_alter_table('observation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_observation_updated_at'))
        batch_op.drop_index(batch_op.f('ix_observation_patient_id'))
        batch_op.drop_index(batch_op.f('ix_observation_observed_at'))
        batch_op.drop_index(batch_op.f('ix_observation_feature'))

    op.drop_table('observation')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_study_id'))
        batch_op.drop_index(batch_op.f('ix_job_state'))
        batch_op.drop_index(batch_op.f('ix_job_created_at'))

    op.drop_table('job')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_state'))
        batch_op.drop_index(batch_op.f('ix_study_patient_id'))
        batch_op.drop_index(batch_op.f('ix_study_last_received_at'))
        batch_op.drop_index(batch_op.f('ix_study_first_received_at'))
        batch_op.drop_index(batch_op.f('ix_study_dicom_patient_index'))
        batch_op.drop_index(batch_op.f('ix_study_accession_index'))

    op.drop_table('study')
    with op.batch_alter_table('patient_identifier', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_patient_identifier_patient_id'))

    op.drop_table('patient_identifier')
    with op.batch_alter_table('hl7_message', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hl7_message_received_at'))
        batch_op.drop_index(batch_op.f('ix_hl7_message_patient_id'))
        batch_op.drop_index(batch_op.f('ix_hl7_message_message_type'))
        batch_op.drop_index(batch_op.f('ix_hl7_message_mapping_state'))

    op.drop_table('hl7_message')
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_patient_created_at'))

    op.drop_table('patient')
    with op.batch_alter_table('data_key', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_data_key_purpose'))
        batch_op.drop_index(batch_op.f('ix_data_key_kek_id'))
        batch_op.drop_index(batch_op.f('ix_data_key_created_at'))

    op.drop_table('data_key')
    op.drop_table('blob_chunk')
    with op.batch_alter_table('blob', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_blob_kind'))
        batch_op.drop_index(batch_op.f('ix_blob_kek_id'))
        batch_op.drop_index(batch_op.f('ix_blob_created_at'))

    op.drop_table('blob')
    op.drop_table('audit_head')
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_event_ts'))
        batch_op.drop_index(batch_op.f('ix_audit_event_subject'))
        batch_op.drop_index(batch_op.f('ix_audit_event_kind'))

    op.drop_table('audit_event')
    with op.batch_alter_table('association', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_association_started_at'))
        batch_op.drop_index(batch_op.f('ix_association_calling_aet'))

    op.drop_table('association')
