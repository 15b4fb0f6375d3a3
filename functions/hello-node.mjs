// The smallest Node.js function: curl localhost:8080/function/hello-node?name=you
export const handler = async (event, context) => {
  const name = event.queryStringParameters?.name ?? "world";
  console.log(`saying hello to ${name}`);
  return { statusCode: 200, headers: { "content-type": "text/plain" }, body: `Hello, ${name}!\n` };
};
