from tortoise import migrations
from tortoise.migrations import operations as ops

# What the API now refuses but SQLite stored before (PostgreSQL never could: its `integer` is 32-bit
# and its `text` holds no NUL), brought within bounds so that every stored queue reads back.
_SETTINGS = [
    "UPDATE queues SET alert_after = 2147483647 WHERE alert_after > 2147483647",
    "UPDATE queues SET retention_seconds = 2147483647 WHERE retention_seconds > 2147483647",
]


async def _within_bounds(apps, schema_editor) -> None:
    client = schema_editor.client
    for statement in _SETTINGS:
        await client.execute_script(statement)
    if client.capabilities.dialect == "sqlite":
        await _replace_nul(client)


async def _replace_nul(client) -> None:
    # In Python: SQLite's replace() sees a text's NUL as its end. U+FFFD, the replacement
    # character, still shows that something was there.
    rows = await client.execute_query_dict(
        "SELECT id, description FROM queues WHERE instr(description, char(0)) > 0"
    )
    for row in rows:
        fixed = row["description"].replace("\x00", "\ufffd")
        await client.execute_query("UPDATE queues SET description = ? WHERE id = ?", [fixed, row["id"]])


class Migration(migrations.Migration):
    dependencies = [("pombo", "0001_initial")]

    operations = [ops.RunPython(_within_bounds, ops.RunPython.noop)]
