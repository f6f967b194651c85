from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from models import MessageStatus, NotificationPriority, Priority
from tortoise.fields.base import OnDelete
from tortoise import fields
from tortoise.indexes import Index

class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name='Event',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('log', fields.CharField(max_length=300)),
                ('seq', fields.BigIntField()),
                ('type', fields.CharField(max_length=40)),
                ('data', fields.TextField(unique=False)),
                ('at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'events', 'app': 'pombo', 'unique_together': (('log', 'seq'),), 'indexes': [Index(fields=['at'])], 'pk_attr': 'id'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='EventLog',
            fields=[
                ('name', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=300)),
                ('last_seq', fields.BigIntField(default=0)),
            ],
            options={'table': 'event_logs', 'app': 'pombo', 'pk_attr': 'name'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Notification',
            fields=[
                ('id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=36)),
                ('recipient', fields.CharField(max_length=255)),
                ('type', fields.CharField(max_length=64)),
                ('priority', fields.IntEnumField(default=NotificationPriority.medium, description='urgent: 0\nhigh: 1\nmedium: 2\nlow: 3', enum_type=NotificationPriority, generated=False)),
                ('title', fields.CharField(max_length=200)),
                ('message', fields.TextField(default='', unique=False)),
                ('queue', fields.CharField(null=True, max_length=64)),
                ('message_id', fields.CharField(null=True, max_length=36)),
                ('action_url', fields.CharField(null=True, max_length=2000)),
                ('is_read', fields.BooleanField(default=False)),
                ('read_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('expires_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'notifications', 'app': 'pombo', 'indexes': [Index(fields=['recipient', 'is_read', 'id']), Index(fields=['recipient', 'id']), Index(fields=['expires_at'])], 'pk_attr': 'id'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Queue',
            fields=[
                ('id', fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('name', fields.CharField(unique=True, max_length=64)),
                ('description', fields.TextField(default='', unique=False)),
                ('owner', fields.CharField(max_length=255)),
                ('visibility_timeout', fields.FloatField(default=30.0)),
                ('max_attempts', fields.IntField(default=5)),
                ('backoff_base', fields.FloatField(default=1.0)),
                ('backoff_max', fields.FloatField(default=300.0)),
                ('retention_seconds', fields.IntField(default=1209600)),
                ('alert_after', fields.IntField(null=True)),
                ('alert_active', fields.BooleanField(default=False)),
                ('dead_letter_urgent', fields.BooleanField(default=False)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('updated_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('deleted_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'queues', 'app': 'pombo', 'pk_attr': 'id'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Message',
            fields=[
                ('id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=36)),
                ('queue', fields.ForeignKeyField('pombo.Queue', source_field='queue_id', db_constraint=True, to_field='id', related_name='messages', on_delete=OnDelete.CASCADE)),
                ('body', fields.TextField(unique=False)),
                ('content_type', fields.CharField(max_length=255)),
                ('type', fields.CharField(default='', max_length=64)),
                ('priority', fields.IntEnumField(default=Priority.normal, description='urgent: 0\nhigh: 1\nnormal: 2\nlow: 3', enum_type=Priority, generated=False)),
                ('headers', fields.JSONField(default=dict, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('status', fields.CharEnumField(default=MessageStatus.pending, description='pending: pending\nprocessing: processing\ndone: done\ndead: dead', enum_type=MessageStatus, max_length=16)),
                ('idempotency_key', fields.CharField(null=True, max_length=255)),
                ('attempts', fields.IntField(default=0)),
                ('available_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('lease_id', fields.CharField(null=True, max_length=36)),
                ('lease_expires_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('last_error', fields.TextField(null=True, unique=False)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('updated_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('finished_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'messages', 'app': 'pombo', 'unique_together': (('queue', 'idempotency_key'),), 'indexes': [Index(fields=['queue_id', 'status', 'priority', 'id']), Index(fields=['queue_id', 'created_at'])], 'pk_attr': 'id'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Token',
            fields=[
                ('id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=36)),
                ('subject', fields.CharField(max_length=255)),
                ('scopes', fields.TextField(unique=False)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('expires_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('revoked_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'tokens', 'app': 'pombo', 'pk_attr': 'id'},
            bases=['Model'],
        ),
    ]
