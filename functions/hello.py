"""The smallest function: curl localhost:8080/function/hello?name=you"""


def handler(event, context):
    name = (event.get("queryStringParameters") or {}).get("name", "world")
    print(f"saying hello to {name}")
    return {"statusCode": 200, "headers": {"content-type": "text/plain"}, "body": f"Hello, {name}!\n"}
