from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('pombo', '0002_settings_within_bounds')]

    initial = False

    operations = [
        ops.AddField(
            model_name='Message',
            name='traceparent',
            field=fields.CharField(null=True, max_length=55),
        ),
    ]
